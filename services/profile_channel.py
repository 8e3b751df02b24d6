"""The lossless path of finished profiles from the aggregator to the shipper.

The shipper binds a ROUTER at ``shipper.sock``; the aggregator connects a DEALER. The aggregator
sends ``profile`` messages and keeps each one in memory until the shipper answers ``ack`` with
its id, which the shipper does only once the profile is fsync'd in its spool. Profiles not
acknowledged within ``resend_after`` seconds are sent again, so a shipper that restarts, or a
message lost in a socket buffer, costs a resend, never a profile. The shipper deduplicates by id,
so a resend of a profile it already has is acknowledged again, not spooled twice.

The memory queue is bounded by bytes: when the shipper is gone for long, the oldest profiles are
dropped and counted (the shipper's disk spool, not this queue, is what rides out long outages).
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from dataclasses import dataclass

import zmq

from services import runtime, wire

log = logging.getLogger("parca_agent.profile_channel")

DEFAULT_MAX_BYTES = 64 * 1024 * 1024  # a few hundred windows of busy targets
DEFAULT_RESEND_AFTER = 5.0  # seconds; well above the time a shipper needs to fsync a profile
# A profile id is an opaque string; longer ones are refused so that ids stay cheap to remember.
MAX_ID_LENGTH = 256


@dataclass
class _Unacked:
    frames: list[bytes]
    size: int
    sent_at: float  # monotonic; 0 when it never left the socket


class ProfileSender:
    """The aggregator's side: send profiles, keep them until acknowledged, resend the rest.

    Not thread-safe: one thread calls ``send``, ``poll`` and ``close``.
    """

    def __init__(self, run_dir: str, *, ctx: zmq.Context | None = None,
                 max_bytes: int = DEFAULT_MAX_BYTES, resend_after: float = DEFAULT_RESEND_AFTER,
                 metrics: runtime.Metrics | None = None, src: str = "aggregator"):
        self.max_bytes = max_bytes
        self.resend_after = resend_after
        self.metrics = metrics or runtime.Metrics("profile_sender")
        self.dropped = 0  # oldest profiles dropped because the queue was full
        self._publisher = wire.Publisher(src)
        self._unacked: OrderedDict[str, _Unacked] = OrderedDict()
        self._bytes = 0
        self._ctx = ctx or zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.DEALER)
        # IMMEDIATE: with no shipper connected, a send fails at once instead of queueing in a
        # pipe that a reconnect may discard; the profile then waits here for its resend.
        self._sock.setsockopt(zmq.IMMEDIATE, 1)
        self._sock.setsockopt(zmq.LINGER, runtime.LINGER_MS)
        self._sock.setsockopt(zmq.SNDHWM, 1000)
        self._sock.setsockopt(zmq.RECONNECT_IVL, 200)
        self._sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        self._sock.connect(wire.endpoint(run_dir, wire.ENDPOINT_SHIPPER))

    def send(self, body: dict) -> None:
        """Queue one ``profile`` body (id, labels, start_ns, end_ns, pprof, samples) and send it.

        Never blocks. A body that lacks a key raises ValueError (from wire.Publisher.encode).
        """
        frames = self._publisher.encode("profile", body)
        profile_id = body["id"]
        size = sum(len(f) for f in frames)
        previous = self._unacked.pop(profile_id, None)
        if previous is not None:
            self._bytes -= previous.size
        while self._unacked and self._bytes + size > self.max_bytes:
            _, oldest = self._unacked.popitem(last=False)
            self._bytes -= oldest.size
            self._count_drop()
        if size > self.max_bytes:
            self._count_drop()
            return
        entry = _Unacked(frames=frames, size=size, sent_at=0.0)
        self._unacked[profile_id] = entry
        self._bytes += size
        self._transmit(entry)

    def poll(self) -> int:
        """Take every waiting ack without blocking, resend what is overdue; return acks taken."""
        acked = 0
        while True:
            try:
                frames = self._sock.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                break
            try:
                msg = wire.decode(frames)
            except wire.WireError as e:
                self.metrics.inc("profile_acks_malformed_total", reason=e.reason)
                continue
            if msg.type != "ack":
                continue
            ack_id = msg.body["id"]
            entry = self._unacked.pop(ack_id, None) if isinstance(ack_id, str) else None
            if entry is not None:
                self._bytes -= entry.size
                acked += 1
        self._resend_overdue()
        self.metrics.set("profiles_unacked", len(self._unacked))
        return acked

    @property
    def socket(self) -> zmq.Socket:
        """The socket acks arrive on, for the caller's poller."""
        return self._sock

    def next_resend_due(self) -> float:
        """When (monotonic) ``poll`` next has a resend to make; inf with nothing unacked. A
        profile that never left (no shipper yet) is tried again half a second from now."""
        if not self._unacked:
            return math.inf
        due = min(e.sent_at for e in self._unacked.values()) + self.resend_after
        now = time.monotonic()
        return due if due > now else now + 0.5

    def pending(self) -> int:
        """Profiles sent but not yet acknowledged."""
        return len(self._unacked)

    def pending_bytes(self) -> int:
        return self._bytes

    def close(self) -> None:
        self._sock.close(linger=runtime.LINGER_MS)

    def _resend_overdue(self) -> None:
        now = time.monotonic()
        for entry in self._unacked.values():
            if now - entry.sent_at >= self.resend_after:
                if not self._transmit(entry):
                    break  # no shipper or a full pipe: the rest would fail too
                self.metrics.inc("profiles_resent_total")

    def _transmit(self, entry: _Unacked) -> bool:
        try:
            self._sock.send_multipart(entry.frames, flags=zmq.NOBLOCK)
        except zmq.Again:
            return False
        entry.sent_at = time.monotonic()
        return True

    def _count_drop(self) -> None:
        self.dropped += 1
        self.metrics.inc("profiles_dropped_total", reason="queue_full")


@dataclass
class ReceivedProfile:
    peer: bytes  # the ROUTER identity of the sender, to address the ack
    message: wire.Message
    frames: list[bytes]  # the message as it came, [topic, header, body]: what the spool keeps


class ProfileInbox:
    """The shipper's side: receive profiles on the ROUTER and acknowledge them by id.

    Every frame sequence is survivable: what does not decode as a ``profile`` with a usable id
    is counted (``messages_malformed_total{reason}``), logged at a rate and dropped.
    """

    def __init__(self, run_dir: str, metrics: runtime.Metrics, *, ctx: zmq.Context | None = None,
                 src: str = "shipper"):
        self.metrics = metrics
        self._publisher = wire.Publisher(src)
        self._bad_log = runtime.RateLimitedLog(log)
        self._ctx = ctx or zmq.Context.instance()
        self.sock = self._ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, runtime.LINGER_MS)
        self.sock.setsockopt(zmq.RCVHWM, 1000)
        self.address = wire.endpoint(run_dir, wire.ENDPOINT_SHIPPER)
        runtime.bind(self.sock, self.address)

    def receive(self) -> ReceivedProfile | None:
        """One profile without blocking, or None (nothing waiting, or a bad message dropped)."""
        try:
            frames = self.sock.recv_multipart(flags=zmq.NOBLOCK)
        except zmq.Again:
            return None
        if len(frames) < 2:
            return self._malformed("frame_count", f"{len(frames)} frames")
        peer = frames[0]
        try:
            msg = wire.decode(frames[1:])
        except wire.WireError as e:
            return self._malformed(e.reason, str(e))
        if msg.type != "profile":
            return self._malformed("unexpected_type", msg.type)
        problem = profile_problem(msg.body)
        if problem:
            return self._malformed("bad_profile", problem)
        self.metrics.inc("messages_received_total", type="profile")
        return ReceivedProfile(peer=peer, message=msg, frames=frames[1:])

    def ack(self, peer: bytes, profile_id: str) -> None:
        frames = self._publisher.encode("ack", {"id": profile_id})
        try:
            self.sock.send_multipart([peer, *frames], flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            # The sender is gone or its pipe is full: it resends, and we ack the duplicate.
            self.metrics.inc("acks_failed_total")

    def close(self) -> None:
        self.sock.close(linger=runtime.LINGER_MS)
        runtime.unlink_endpoint(self.address)

    def _malformed(self, reason: str, detail: str) -> None:
        self.metrics.inc("messages_malformed_total", reason=reason)
        self._bad_log.warning(reason, f"dropped a malformed message on the profile channel: "
                                      f"{detail[:200]}")
        return None


def profile_problem(body: dict) -> str:
    """Why a profile body cannot be shipped, or "" when it can."""
    profile_id = body.get("id")
    if not isinstance(profile_id, str) or not profile_id or len(profile_id) > MAX_ID_LENGTH:
        return "id is not a short non-empty string"
    labels = body.get("labels")
    if not isinstance(labels, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        return "labels is not a map of strings"
    if not isinstance(body.get("pprof"), bytes):
        return "pprof is not bytes"
    for key in ("start_ns", "end_ns", "samples"):
        if not isinstance(body.get(key), int) or isinstance(body.get(key), bool):
            return f"{key} is not an integer"
    return ""
