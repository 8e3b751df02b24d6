"""The UI's ZeroMQ side: one thread reads profiles and heartbeats into the stores.

Losing a message here is acceptable (the next window replaces it), so the UI is a plain SUB
subscriber; gaps are counted from sequence numbers. Every body is checked before use: a message
that decodes but has the wrong shape is counted as malformed, never raised.
"""

from __future__ import annotations

import logging
import os
import threading
import time

import zmq

from services import runtime, wire
from services.ui.state import ServiceHealth, TargetStore, Window

SOURCES = (wire.ENDPOINT_AGGREGATOR, wire.ENDPOINT_COLLECTOR, wire.ENDPOINT_DISCOVERY,
           wire.ENDPOINT_SHIPPER_PUB)
MAX_BATCH = 200  # messages per poll turn, so the stop flag and heartbeats are never starved
MAX_LABELS = 64
MAX_LABEL_CHARS = 1024
MAX_METRICS = 4096
# After a message wakes the feed it waits this long before reading: the heartbeats of the
# other services, all sent on the same wall-clock multiple (runtime.Heartbeat), arrive within
# it and are read in one wake-up instead of one each.
GATHER_MS = 250
# The UI's own heartbeat waits this long past the multiple for theirs to wake the feed.
HEARTBEAT_LAG = 0.5

log = logging.getLogger("parca_agent.ui")


class Feed:
    def __init__(self, run_dir: str, targets: TargetStore, health: ServiceHealth,
                 metrics: runtime.Metrics, stop: runtime.StopFlag):
        self.run_dir = run_dir
        self.targets = targets
        self.health = health
        self.metrics = metrics
        self.stop = stop
        self.bad_log = runtime.RateLimitedLog(log)
        self.gaps = wire.GapCounter()
        self.heartbeat = runtime.Heartbeat("ui", wire.Publisher("ui"), metrics, lag=HEARTBEAT_LAG)
        self.failed = False
        self.thread = threading.Thread(target=self._run, name="ui-feed", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def join(self, timeout: float) -> None:
        self.thread.join(timeout)

    def _run(self) -> None:
        ctx = zmq.Context.instance()
        pub_address = wire.endpoint(self.run_dir, wire.ENDPOINT_UI_PUB)
        pub = runtime.pub_socket(ctx, [pub_address])
        sub = runtime.sub_socket(ctx, [wire.endpoint(self.run_dir, e) for e in SOURCES],
                                 [wire.TOPIC_PROFILE, wire.TOPIC_HEARTBEAT])
        poller = zmq.Poller()
        poller.register(sub, zmq.POLLIN)
        poller.register(self.stop.fileno(), zmq.POLLIN)
        try:
            while not self.stop.is_set():
                if self.heartbeat.due():
                    self._beat(pub)
                # Sleep until a message, the stop or the next heartbeat.
                if not poller.poll(runtime.poll_ms(self.heartbeat.next_due)):
                    continue
                # Messages come in bursts (every service's heartbeat on the same wall-clock
                # multiple, a window's profiles): let the burst arrive, read it in one wake-up.
                if self.stop.wait(GATHER_MS / 1000):
                    break
                for _ in range(MAX_BATCH):
                    # Asked of the socket, not told by receive(): it returns None for a
                    # malformed message too, and stopping at one would leave the rest of the
                    # burst for the next wake-up, a gather later (garbage would starve it).
                    if not sub.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                        break
                    msg = runtime.receive(sub, self.metrics, self.gaps, self.bad_log)
                    if msg is not None:
                        self.handle(msg)
        except Exception:  # a bug here must not leave a UI that silently shows stale data
            log.exception("the feed thread failed; stopping the UI")
            self.failed = True
            self.stop.set()
        finally:
            sub.close()
            pub.close()
            runtime.unlink_endpoint(pub_address)

    def _beat(self, pub: zmq.Socket) -> None:
        self.targets.expire()
        self.metrics.set("targets", self.targets.count())  # not targets(): it copies and sorts
        self.metrics.set("profile_bytes", self.targets.total_bytes)
        self.heartbeat.send(pub)
        self.health.record("ui", os.getpid(), self.heartbeat.started, self.metrics.snapshot())

    def handle(self, msg: wire.Message) -> None:
        if msg.type == "profiles":
            if not isinstance(msg.body["profiles"], list):
                return self._malformed("bad_profiles", "profiles is not a list")
            for body in msg.body["profiles"]:
                if not isinstance(body, dict) or not all(
                        k in body for k in wire.MESSAGE_FIELDS["profile"]):
                    self._malformed("bad_profile", "a profile of a batch lacks a key")
                    continue
                self._profile(body)
        elif msg.type == "profile":
            self._profile(msg.body)
        elif msg.type == "heartbeat":
            self._heartbeat(msg)

    def _malformed(self, reason: str, detail: str) -> None:
        self.metrics.inc("messages_malformed_total", reason=reason)
        self.bad_log.warning(reason, f"dropped a {reason.split('_')[-1]} message: {detail}")

    def _profile(self, b: dict) -> None:
        labels = b["labels"]
        if (not isinstance(labels, dict) or len(labels) > MAX_LABELS
                or not all(isinstance(k, str) and isinstance(v, str) and len(k) <= MAX_LABEL_CHARS
                           and len(v) <= MAX_LABEL_CHARS for k, v in labels.items())):
            return self._malformed("bad_profile", "labels are not a small map of strings")
        if not isinstance(b["pprof"], bytes):
            return self._malformed("bad_profile", "pprof is not bytes")
        if not all(isinstance(b[k], int) for k in ("start_ns", "end_ns", "samples")):
            return self._malformed("bad_profile", "start_ns, end_ns or samples is not an integer")
        # `error` is not in wire 1.0; a later minor version may say why a window is empty.
        error = b.get("error") if isinstance(b.get("error"), str) else None
        if b["pprof"][:2] != b"\x1f\x8b":
            error = "pprof is not gzip-compressed"
        window = Window(profile_id=str(b["id"])[:200], start_ns=b["start_ns"], end_ns=b["end_ns"],
                        pprof_gz=b["pprof"], samples=b["samples"], received=time.time())
        self.targets.add(labels, window, error)
        self.metrics.inc("profiles_received_total")

    def _heartbeat(self, msg: wire.Message) -> None:
        b = msg.body
        name, pid, started, metrics = b["service"], b["pid"], b["started"], b["metrics"]
        if (not isinstance(name, str) or not 0 < len(name) <= 64 or not isinstance(pid, int)
                or not isinstance(started, (int, float)) or not isinstance(metrics, list)):
            return self._malformed("bad_heartbeat", "service, pid, started or metrics has the "
                                   "wrong type")
        clean = [[m[0], m[1], float(m[2])] for m in metrics[:MAX_METRICS]
                 if isinstance(m, (list, tuple)) and len(m) == 3 and isinstance(m[0], str)
                 and isinstance(m[1], dict) and isinstance(m[2], (int, float))
                 and all(isinstance(k, str) and isinstance(v, str) for k, v in m[1].items())]
        self.health.record(name, pid, float(started), clean)
