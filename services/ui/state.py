"""What the UI knows: each target's recent profiles, and each service's last heartbeat.

The ZeroMQ thread writes, HTTP threads read; one lock guards each store. Everything is bounded:
windows per target by age, count and bytes, targets by count and by how long since they were
seen, so a flood of targets or huge profiles costs at most a fixed amount of memory.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from services.runtime import HEARTBEAT_INTERVAL

HISTORY_SECONDS = 600.0  # the longest range the profile page offers
MAX_WINDOWS_PER_TARGET = 240  # 10 minutes of windows as short as 2.5 s
MAX_TARGETS = 2000
MAX_TOTAL_BYTES = 256 * 1024 * 1024  # compressed pprof across every target
TARGET_EXPIRY_SECONDS = 300.0  # a target without a profile for this long is gone
# Expired targets are looked for at most this often: the look is a pass over every target, and
# doing it on each profile cost more than the rest of taking it in with a few hundred targets.
EXPIRY_SCAN_SECONDS = 1.0
RANGES = {"latest": 0.0, "1m": 60.0, "5m": 300.0, "10m": 600.0}


def target_id(labels: dict[str, str]) -> str:
    """A stable, URL-safe name for a label set (it goes into paths, never into HTML unescaped)."""
    canonical = json.dumps(sorted(labels.items()), ensure_ascii=False).encode()
    return hashlib.sha256(canonical).hexdigest()[:20]


@dataclass
class Window:
    """One profile as the aggregator sent it."""

    profile_id: str
    start_ns: int
    end_ns: int
    pprof_gz: bytes
    samples: int
    received: float  # unix seconds


@dataclass
class Target:
    id: str
    labels: dict[str, str]
    windows: deque = field(default_factory=deque)  # oldest first; the last is the latest
    error: str | None = None
    last_seen: float = 0.0  # unix seconds the latest window arrived

    @property
    def latest(self) -> Window | None:
        return self.windows[-1] if self.windows else None


class TargetStore:
    def __init__(self, clock=time.time):
        self._clock = clock
        self._targets: dict[str, Target] = {}
        self._bytes = 0
        self._lock = threading.Lock()
        # Notified on every new window; /query waits on it for the next matching profile.
        self._arrived = threading.Condition(self._lock)
        self._generation = 0
        self._scanned_at = float("-inf")  # the clock's time of the last expiry scan
        self._ids: dict[tuple, str] = {}  # sorted label items -> target_id, for the feed

    @property
    def total_bytes(self) -> int:
        return self._bytes

    def add(self, labels: dict[str, str], window: Window, error: str | None = None) -> Target:
        with self._lock:
            key = tuple(sorted(labels.items()))
            tid = self._ids.get(key)
            if tid is None:
                if len(self._ids) >= 2 * MAX_TARGETS:
                    self._ids.clear()
                tid = self._ids[key] = target_id(labels)
            target = self._targets.get(tid)
            if target is None:
                target = self._targets[tid] = Target(tid, dict(labels))
            target.windows.append(window)
            target.error = error
            target.last_seen = window.received
            self._bytes += len(window.pprof_gz)
            self._trim(target)
            self._evict()
            self._generation += 1
            self._arrived.notify_all()
            return target

    def set_error(self, tid: str, error: str | None) -> None:
        with self._lock:
            target = self._targets.get(tid)
            if target is not None:
                target.error = error

    def _drop_oldest(self, target: Target) -> None:
        self._bytes -= len(target.windows.popleft().pprof_gz)

    def _trim(self, target: Target) -> None:
        newest = target.windows[-1].end_ns
        while len(target.windows) > 1 and (
                len(target.windows) > MAX_WINDOWS_PER_TARGET
                or newest - target.windows[0].end_ns > HISTORY_SECONDS * 1e9):
            self._drop_oldest(target)

    def _evict(self, scan: bool = False) -> None:
        now = self._clock()
        if scan or now - self._scanned_at >= EXPIRY_SCAN_SECONDS:
            self._scanned_at = now
            for tid in [t.id for t in self._targets.values()
                        if now - t.last_seen > TARGET_EXPIRY_SECONDS]:
                self._remove(tid)
        while len(self._targets) > MAX_TARGETS:
            self._remove(min(self._targets.values(), key=lambda t: t.last_seen).id)
        while self._bytes > MAX_TOTAL_BYTES and self._targets:
            # The globally oldest window goes first; a target keeps its latest while it can.
            with_history = [t for t in self._targets.values() if len(t.windows) > 1]
            if with_history:
                self._drop_oldest(min(with_history, key=lambda t: t.windows[0].received))
            else:
                self._remove(min(self._targets.values(), key=lambda t: t.last_seen).id)

    def _remove(self, tid: str) -> None:
        target = self._targets.pop(tid)
        self._bytes -= sum(len(w.pprof_gz) for w in target.windows)

    def expire(self) -> None:
        with self._lock:
            self._evict(scan=True)

    def count(self) -> int:
        with self._lock:
            return len(self._targets)

    def targets(self) -> list[Target]:
        """A copy of every target, sorted by labels (the windows are shared, not copied)."""
        with self._lock:
            out = [Target(t.id, t.labels, deque(t.windows), t.error, t.last_seen)
                   for t in self._targets.values()]
        return sorted(out, key=lambda t: sorted(t.labels.items()))

    def get(self, tid: str) -> Target | None:
        with self._lock:
            t = self._targets.get(tid)
            return None if t is None else Target(t.id, t.labels, deque(t.windows), t.error,
                                                 t.last_seen)

    def windows_in_range(self, tid: str, range_name: str) -> tuple[Target, list[Window]] | None:
        """The windows a range covers, measured back from the target's latest window."""
        target = self.get(tid)
        if target is None or target.latest is None:
            return None
        seconds = RANGES[range_name]
        if not seconds:
            return target, [target.latest]
        since = target.latest.end_ns - seconds * 1e9
        return target, [w for w in target.windows if w.end_ns > since]

    def wait_next(self, predicate, timeout: float, stop: threading.Event | None = None):
        """The next (target, window) to arrive for which predicate(labels) holds, or None."""
        deadline = time.monotonic() + timeout
        with self._lock:
            seen = self._generation
            newest = {tid: t.latest for tid, t in self._targets.items()}
            while True:
                if self._generation != seen:
                    seen = self._generation
                    for tid, t in self._targets.items():
                        if t.latest is not newest.get(tid) and predicate(t.labels):
                            return Target(t.id, t.labels, deque(t.windows), t.error,
                                          t.last_seen), t.latest
                    newest = {tid: t.latest for tid, t in self._targets.items()}
                left = deadline - time.monotonic()
                if left <= 0 or (stop is not None and stop.is_set()):
                    return None
                self._arrived.wait(min(left, 0.5))


@dataclass
class ServiceState:
    name: str
    pid: int = 0
    started: float = 0.0
    last_heartbeat: float = 0.0  # unix seconds
    metrics: list = field(default_factory=list)  # [[name, {labels}, value], ...]
    samples_per_second: float | None = None


class ServiceHealth:
    """The last heartbeat of every service; a service is alive while heartbeats keep coming."""

    # Heartbeats come every HEARTBEAT_INTERVAL: missing three in a row means down.
    ALIVE_SECONDS = 3 * HEARTBEAT_INTERVAL + 1.0
    EXPECTED = ("collector", "discovery", "aggregator", "shipper", "ui")

    def __init__(self, clock=time.time):
        self._clock = clock
        self._services: dict[str, ServiceState] = {n: ServiceState(n) for n in self.EXPECTED}
        self._lock = threading.Lock()

    def record(self, name: str, pid: int, started: float, metrics: list) -> None:
        now = self._clock()
        with self._lock:
            state = self._services.get(name)
            if state is None:
                if len(self._services) >= 64:  # names come off the wire: bound them
                    return
                state = self._services[name] = ServiceState(name)
            samples_now = _sum(metrics, lambda n: n.endswith("_samples_total"))
            if state.last_heartbeat and samples_now is not None and state.pid == pid:
                before = _sum(state.metrics, lambda n: n.endswith("_samples_total"))
                elapsed = now - state.last_heartbeat
                if before is not None and elapsed > 0 and samples_now >= before:
                    state.samples_per_second = (samples_now - before) / elapsed
            state.pid, state.started, state.last_heartbeat = pid, started, now
            state.metrics = metrics

    def refresh_metrics(self, name: str, metrics: list) -> None:
        """Replace a service's metrics without counting a heartbeat: the UI's own, which it
        knows live, so /metrics never shows them a heartbeat interval old."""
        with self._lock:
            state = self._services.get(name)
            if state is not None and state.last_heartbeat:
                state.metrics = metrics

    def alive(self, state: ServiceState) -> bool:
        return (state.last_heartbeat > 0
                and self._clock() - state.last_heartbeat < self.ALIVE_SECONDS)

    def services(self) -> list[ServiceState]:
        with self._lock:
            return [ServiceState(s.name, s.pid, s.started, s.last_heartbeat, list(s.metrics),
                                 s.samples_per_second) for s in self._services.values()]

    def summary(self, state: ServiceState) -> dict:
        """The row of the health table: counters summed over their labels."""
        m = state.metrics
        return {
            "service": state.name,
            "alive": self.alive(state),
            "pid": state.pid or None,
            "started": state.started or None,
            "last_heartbeat": state.last_heartbeat or None,
            "samples_per_second": state.samples_per_second,
            "samples": _sum(m, lambda n: n.endswith("_samples_total")),
            "drops": _sum(m, lambda n: n.endswith(("_dropped_total", "_lost_total"))),
            "stack_errors": _sum(m, lambda n: n.endswith("_stack_errors_total")),
            "malformed": _sum(m, lambda n: n.endswith("_malformed_total")),
            "metrics": [{"name": n, "labels": lb, "value": v} for n, lb, v in m],
        }


def _sum(metrics: list, name_matches) -> float | None:
    """Sum of the metrics whose name matches; None when the service reports none of them."""
    values = [v for name, _labels, v in metrics if name_matches(name)]
    return sum(values) if values else None
