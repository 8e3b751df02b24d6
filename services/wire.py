"""The wire: every ZeroMQ message any service sends or receives goes through this module.

A message is three frames, ``[topic, header, body]``:

- ``topic``: ASCII bytes, dotted (``samples``, ``process``, ``targets``, ``profile``,
  ``heartbeat.<service>``), so that a SUB socket can filter by prefix.
- ``header``: a msgpack map ``{"v": [major, minor], "type": str, "src": str, "seq": int,
  "ts": float}``. ``seq`` counts from 1 per publisher and topic, so a subscriber
  that takes only some topics still sees every gap (drop) in those it takes.
- ``body``: a msgpack map whose keys depend on ``type`` (see ``MESSAGE_FIELDS`` and
  docs/wire.md, which a test keeps in step with this module).

No service calls msgpack itself. Receivers call ``decode`` and get a ``Message`` or a
``WireError``; they count the error and go on, never crash. Minor versions only add fields, so a
receiver accepts any minor of its major and ignores unknown keys.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

import msgpack

WIRE_VERSION = (1, 1)  # 1.1 added `profiles`

# Message types and the body keys each one must carry (more keys are allowed: minor versions add).
MESSAGE_FIELDS: dict[str, tuple[str, ...]] = {
    # collector -> anyone: counts drained from the kernel since the previous batch.
    "samples": ("time_ns", "duration_ns", "frequency", "records", "stacks", "kernel_symbols"),
    # collector -> anyone: what a process is and which files it maps.
    "process": ("pid", "start_time", "comm", "executable", "mappings"),
    # discovery -> collector, aggregator, ui: the full set of targets, never a delta.
    "targets": ("targets", "filtering"),
    # aggregator -> shipper (acknowledged), ui (PUB): one finished profile.
    "profile": ("id", "labels", "start_ns", "end_ns", "pprof", "samples"),
    # aggregator -> shipper (acknowledged as one, by its id), ui (PUB): finished profiles, each
    # a `profile` body; what the aggregator sends, a window's profiles in as few as the batch
    # bounds allow (every message costs each hop its receive, decode and ack).
    "profiles": ("id", "profiles"),
    # shipper -> aggregator: the profile with this id is safe in the spool.
    "ack": ("id",),
    # every service -> ui: alive, with its counters.
    "heartbeat": ("service", "pid", "started", "metrics"),
}

# Topics: one per message type, heartbeats suffixed with the service name.
TOPIC_SAMPLES = b"samples"
TOPIC_PROCESS = b"process"
TOPIC_TARGETS = b"targets"
TOPIC_PROFILE = b"profile"  # a prefix of b"profiles" too: a SUB to it takes both
TOPIC_ACK = b"ack"
TOPIC_HEARTBEAT = b"heartbeat"

# Endpoint file names in the run directory. Each publisher binds its own PUB socket.
ENDPOINT_COLLECTOR = "collector.sock"  # PUB: samples, process, heartbeat.collector (the tap)
ENDPOINT_DISCOVERY = "discovery.sock"  # PUB: targets, heartbeat.discovery
ENDPOINT_AGGREGATOR = "aggregator.sock"  # PUB: profile, heartbeat.aggregator
ENDPOINT_SHIPPER = "shipper.sock"  # ROUTER: profile in, ack out (no loss)
ENDPOINT_SHIPPER_PUB = "shipper-pub.sock"  # PUB: heartbeat.shipper
ENDPOINT_UI_PUB = "ui-pub.sock"  # PUB: heartbeat.ui

ALL_ENDPOINTS = (
    ENDPOINT_COLLECTOR,
    ENDPOINT_DISCOVERY,
    ENDPOINT_AGGREGATOR,
    ENDPOINT_SHIPPER,
    ENDPOINT_SHIPPER_PUB,
    ENDPOINT_UI_PUB,
)

# Bodies of these types decode their arrays as tuples, not lists: samples are the stream's bulk,
# msgpack makes a tuple faster than a list, and the aggregator keys its dicts by stack tuples.
TUPLE_BODIES = frozenset({"samples"})

# Largest frame a receiver will try to decode; larger ones are dropped as malformed. A window's
# profile of a busy target is a few MB; the collector's batches are far smaller.
MAX_FRAME_BYTES = 64 * 1024 * 1024


def endpoint(run_dir: str, name: str) -> str:
    """The ipc:// address of an endpoint file in the run directory."""
    return "ipc://" + os.path.join(run_dir, name)


class WireError(Exception):
    """A message that cannot be used. The receiver counts it (by ``reason``) and reads on."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass
class Message:
    type: str
    body: dict[str, Any]
    src: str = ""
    seq: int = 0
    ts: float = 0.0
    version: tuple[int, int] = WIRE_VERSION
    topic: bytes = b""


@dataclass
class Publisher:
    """Numbers and encodes the messages of one sending socket."""

    src: str
    seq: dict[bytes, int] = field(default_factory=dict)  # per topic
    _packer: msgpack.Packer = field(default_factory=lambda: msgpack.Packer(use_bin_type=True))

    def encode(self, mtype: str, body: dict[str, Any], topic: bytes | None = None) -> list[bytes]:
        check_fields(mtype, body)
        if topic is None:
            topic = default_topic(mtype, self.src)
        seq = self.seq[topic] = self.seq.get(topic, 0) + 1
        header = {"v": list(WIRE_VERSION), "type": mtype, "src": self.src, "seq": seq,
                  "ts": time.time()}
        return [topic, self._packer.pack(header), self._packer.pack(body)]


def check_fields(mtype: str, body: dict[str, Any]) -> None:
    """ValueError when ``body`` lacks a key its type must carry."""
    missing = [k for k in MESSAGE_FIELDS[mtype] if k not in body]
    if missing:
        raise ValueError(f"{mtype} message lacks {missing}")


def default_topic(mtype: str, src: str) -> bytes:
    if mtype == "heartbeat":
        return TOPIC_HEARTBEAT + b"." + src.encode()
    return mtype.encode()


def decode(frames: list[bytes]) -> Message:
    """Decode ``[topic, header, body]``; raise WireError for anything unusable."""
    if len(frames) != 3:
        raise WireError("frame_count", f"{len(frames)} frames")
    topic, raw_header, raw_body = frames
    if len(raw_header) > 4096 or len(raw_body) > MAX_FRAME_BYTES:
        raise WireError("too_large")
    try:
        header = msgpack.unpackb(raw_header, raw=False, strict_map_key=False)
    except Exception as e:  # msgpack raises several unrelated types for garbage
        raise WireError("bad_header", type(e).__name__) from None
    if not isinstance(header, dict):
        raise WireError("bad_header", "not a map")
    version = header.get("v")
    if (not isinstance(version, (list, tuple)) or len(version) != 2
            or not all(isinstance(x, int) for x in version)):
        raise WireError("bad_header", "no version")
    if version[0] != WIRE_VERSION[0]:
        raise WireError("unknown_version", f"{version[0]}.{version[1]}")
    mtype = header.get("type")
    if mtype not in MESSAGE_FIELDS:
        raise WireError("unknown_type", repr(mtype)[:40])
    seq = header.get("seq", 0)
    ts = header.get("ts", 0.0)
    src = header.get("src", "")
    if not isinstance(seq, int) or not isinstance(ts, (int, float)) or not isinstance(src, str):
        raise WireError("bad_header", "field types")
    try:
        body = msgpack.unpackb(raw_body, raw=False, strict_map_key=False,
                               use_list=mtype not in TUPLE_BODIES)
    except Exception as e:
        raise WireError("bad_body", type(e).__name__) from None
    if not isinstance(body, dict):
        raise WireError("bad_body", "not a map")
    missing = [k for k in MESSAGE_FIELDS[mtype] if k not in body]
    if missing:
        raise WireError("bad_body", f"{mtype} lacks {missing[0]}")
    return Message(type=mtype, body=body, src=src, seq=seq, ts=float(ts),
                   version=(version[0], version[1]), topic=bytes(topic))


@dataclass
class GapCounter:
    """Counts messages lost between a subscriber and each publisher, from sequence numbers
    (which count per publisher and topic)."""

    last_seq: dict[tuple[str, bytes], int] = field(default_factory=dict)
    lost: int = 0

    def observe(self, msg: Message) -> int:
        """Record a message; return how many were missed just before it."""
        key = (msg.src, msg.topic)
        prev = self.last_seq.get(key)
        self.last_seq[key] = msg.seq
        if prev is None or msg.seq <= prev:
            # First message from this publisher, or it restarted (sequence starts again).
            return 0
        gap = msg.seq - prev - 1
        self.lost += gap
        return gap
