"""The lossless path of finished profiles from the aggregator to the shipper.

The shipper binds a ROUTER at ``shipper.sock``; the aggregator connects a DEALER. The aggregator
sends ``profile`` messages and keeps each one in memory until the shipper answers ``ack`` with
its id, which the shipper does only once the profile is fsync'd in its spool. Profiles not
acknowledged within ``resend_after`` seconds are sent again, so a shipper that restarts, or a
message lost in a socket buffer, costs a resend, never a profile. The shipper deduplicates by id,
so a resend of a profile it already has is acknowledged again, not spooled twice.

The memory queue is bounded by bytes: when the shipper is gone for long, the oldest profiles are
dropped and counted (the shipper's disk spool, not this queue, is what rides out long outages).

The aggregator sends a window's profiles as ``profiles`` messages (``send_many``: as few as the
batch bounds allow), acknowledged and resent as one by the batch's id; the shipper spools each
profile on its own (deduplicated by profile id, so a resent batch spools only what it lacks)
and acknowledges the batch once all are safe. One message per profile cost every hop its
receive, decode and ack: with a few hundred small targets, more than building the profiles.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import zmq

from services import runtime, wire

log = logging.getLogger("parca_agent.profile_channel")

DEFAULT_MAX_BYTES = 64 * 1024 * 1024  # a few hundred windows of busy targets
# Seconds; well above the time a shipper needs to spool a batch (two fsyncs a profile: a full
# batch on a slow disk may take longer, and its resend then costs a duplicate, not a profile).
DEFAULT_RESEND_AFTER = 5.0
# A profile id is an opaque string; longer ones are refused so that ids stay cheap to remember.
MAX_ID_LENGTH = 256
# A batch: at most this many profiles, and this many bytes of pprof (a larger profile goes alone),
# far below a receiver's frame limit (wire.MAX_FRAME_BYTES).
BATCH_MAX_PROFILES = 256
BATCH_MAX_BYTES = 4 * 1024 * 1024


@dataclass
class _Unacked:
    frames: list[bytes]
    size: int
    sent_at: float  # monotonic; 0 when it never left the socket
    count: int = 1  # profiles in it


def batches(bodies: Iterable[dict], max_profiles: int | None = None,
            max_bytes: int | None = None) -> Iterator[list[dict]]:
    """Profile bodies in order, grouped within the batch bounds (BATCH_MAX_* by default)."""
    max_profiles = BATCH_MAX_PROFILES if max_profiles is None else max_profiles
    max_bytes = BATCH_MAX_BYTES if max_bytes is None else max_bytes
    batch: list[dict] = []
    size = 0
    for body in bodies:
        n = len(body["pprof"])
        if batch and (len(batch) >= max_profiles or size + n > max_bytes):
            yield batch
            batch, size = [], 0
        batch.append(body)
        size += n
    if batch:
        yield batch


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
        self._unacked: OrderedDict[str, _Unacked] = OrderedDict()  # by profile or batch id
        self._bytes = 0
        self._profiles = 0
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
        self._queue(body["id"], self._publisher.encode("profile", body), 1)

    def send_many(self, bodies: list[dict]) -> list[list[bytes]]:
        """Queue profile bodies and send them as ``profiles`` messages within the batch bounds;
        return those messages' frames (the aggregator publishes the same frames to the UI: one
        encoding, one sequence). Never blocks; a body that lacks a key raises ValueError and
        nothing is queued."""
        for body in bodies:
            wire.check_fields("profile", body)
        sent = []
        for batch in batches(bodies):
            batch_id = uuid.uuid4().hex
            frames = self._publisher.encode("profiles", {"id": batch_id, "profiles": batch})
            self._queue(batch_id, frames, len(batch))
            sent.append(frames)
        return sent

    def _queue(self, message_id: str, frames: list[bytes], count: int) -> None:
        size = sum(len(f) for f in frames)
        if size > self.max_bytes:  # would never fit: the queue keeps what it has
            self._count_drop(count)
            return
        previous = self._unacked.pop(message_id, None)
        if previous is not None:
            self._forget(previous)
        while self._unacked and self._bytes + size > self.max_bytes:
            _, oldest = self._unacked.popitem(last=False)
            self._forget(oldest)
            self._count_drop(oldest.count)
        entry = _Unacked(frames=frames, size=size, sent_at=0.0, count=count)
        self._unacked[message_id] = entry
        self._bytes += size
        self._profiles += count
        self._transmit(entry)

    def _forget(self, entry: _Unacked) -> None:
        self._bytes -= entry.size
        self._profiles -= entry.count

    def poll(self) -> int:
        """Take every waiting ack without blocking, resend what is overdue; return the number
        of profiles acknowledged."""
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
                self._forget(entry)
                acked += entry.count
        self._resend_overdue()
        self.metrics.set("profiles_unacked", self._profiles)
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
        return self._profiles

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
                self.metrics.inc("profiles_resent_total", entry.count)

    def _transmit(self, entry: _Unacked) -> bool:
        try:
            self._sock.send_multipart(entry.frames, flags=zmq.NOBLOCK)
        except zmq.Again:
            return False
        entry.sent_at = time.monotonic()
        return True

    def _count_drop(self, count: int) -> None:
        self.dropped += count
        self.metrics.inc("profiles_dropped_total", count, reason="queue_full")


@dataclass
class ReceivedProfile:
    peer: bytes  # the ROUTER identity of the sender, to address the ack
    message: wire.Message  # a ``profile`` message
    _frames: list[bytes] | None = None
    # Encodes a profile of a batch as its own ``profile`` message when first asked for: a
    # shipper without a store never asks (~10 us a profile, a few hundred profiles a window).
    _encoder: wire.Publisher | None = None

    @property
    def frames(self) -> list[bytes]:
        """The profile as one ``profile`` message: what the spool keeps."""
        if self._frames is None:
            assert self._encoder is not None
            self._frames = self._encoder.encode("profile", self.message.body)
        return self._frames


@dataclass
class Delivery:
    """What one message brought: its profiles, and the id to acknowledge once all are safe
    (the profile's own for ``profile``, the batch's for ``profiles``)."""
    peer: bytes
    ack_id: str
    profiles: list[ReceivedProfile]


class ProfileInbox:
    """The shipper's side: receive profiles on the ROUTER and acknowledge them by id.

    Every frame sequence is survivable: what does not decode as a ``profile`` or ``profiles``
    with a usable id is counted (``messages_malformed_total{reason}``), logged at a rate and
    dropped; a bad profile inside a good batch is counted and left out.
    """

    def __init__(self, run_dir: str, metrics: runtime.Metrics, *, ctx: zmq.Context | None = None,
                 src: str = "shipper"):
        self.metrics = metrics
        self._publisher = wire.Publisher(src)
        # Re-encodes each profile of a batch as a ``profile`` message, the spool's unit.
        self._unbatcher = wire.Publisher("aggregator")
        self._bad_log = runtime.RateLimitedLog(log)
        self._ctx = ctx or zmq.Context.instance()
        self.sock = self._ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, runtime.LINGER_MS)
        self.sock.setsockopt(zmq.RCVHWM, 1000)
        self.address = wire.endpoint(run_dir, wire.ENDPOINT_SHIPPER)
        runtime.bind(self.sock, self.address)

    def receive(self) -> Delivery | None:
        """One message's profiles without blocking, or None (nothing waiting, or a bad message
        dropped)."""
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
        if msg.type == "profile":
            problem = profile_problem(msg.body)
            if problem:
                return self._malformed("bad_profile", problem)
            self.metrics.inc("messages_received_total", type="profile")
            return Delivery(peer, msg.body["id"], [ReceivedProfile(peer, msg, frames[1:])])
        if msg.type != "profiles":
            return self._malformed("unexpected_type", msg.type)
        batch_id, bodies = msg.body["id"], msg.body["profiles"]
        if not _usable_id(batch_id) or not isinstance(bodies, list):
            return self._malformed("bad_profiles", "id is not a short non-empty string or "
                                   "profiles is not a list")
        self.metrics.inc("messages_received_total", type="profiles")
        received = []
        for body in bodies:
            problem = profile_problem(body) if isinstance(body, dict) else "not a map"
            if problem:
                self._malformed("bad_profile", problem)  # resending would not mend it
                continue
            received.append(ReceivedProfile(
                peer, wire.Message("profile", body, src=msg.src, seq=msg.seq, ts=msg.ts,
                                   version=msg.version, topic=wire.TOPIC_PROFILE),
                _encoder=self._unbatcher))
        return Delivery(peer, batch_id, received)

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


def _usable_id(value) -> bool:
    return isinstance(value, str) and 0 < len(value) <= MAX_ID_LENGTH


def profile_problem(body: dict) -> str:
    """Why a profile body cannot be shipped, or "" when it can."""
    if not _usable_id(body.get("id")):
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
