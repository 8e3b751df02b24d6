"""Samples into targets and windows, and windows into pprof profiles.

Windows are aligned to wall-clock multiples of the profiling duration and a batch of samples
belongs to the window containing the batch's drain time, so a batch is never split or counted
twice; a window closes once its end plus a grace period has passed, giving batches in flight
time to arrive. This class does no I/O: the service feeds it decoded messages and a clock.
"""

from __future__ import annotations

import bisect
import logging
import time
import uuid
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field

from services.aggregator.profile_builder import Frame, MappingInfo, ProfileBuilder
from services.aggregator.symbols import Symbolizer
from services.discovery.sampling import keep

log = logging.getLogger("parca_agent.aggregator")

GRACE_NS = 1_500_000_000  # a drain happens every second: wait for the last one of the window
PROCESS_TTL = 300.0  # seconds a process's metadata is kept after its last sample
MAX_PROCESSES = 32768
MAX_KERNEL_NAMES = 500_000


@dataclass
class ProcessMeta:
    pid: int
    start_time: int
    comm: str
    executable: str
    mappings: list[MappingInfo]
    cache_paths: list[str]
    starts: list[int]
    last_used: float = 0.0

    def mapping_of(self, address: int) -> int:
        i = bisect.bisect_right(self.starts, address) - 1
        if i >= 0 and address < self.mappings[i].limit:
            return i
        return -1


@dataclass
class Target:
    key: tuple
    labels: dict[str, str] | None  # None: one process's target, labeled when its window closes
    per_process: bool = False
    # (pid, tid, user stack, kernel stack) -> samples
    stacks: dict[tuple, int] = field(default_factory=lambda: defaultdict(int))
    samples: int = 0


@dataclass
class Window:
    start_ns: int
    end_ns: int
    targets: dict[tuple, Target] = field(default_factory=dict)


class WindowAggregator:
    def __init__(self, node: str, duration_s: float, frequency: int, symbolizer: Symbolizer,
                 metrics=None, clock=time.time_ns, sampling_ratio: float = 1.0):
        self.node = node
        # Discovery samples its own targets; per-process targets exist only here, so the
        # --sampling-ratio is applied to them here, by the same stable hash of their labels.
        self.sampling_ratio = sampling_ratio
        self.duration_ns = int(duration_s * 1e9)
        self.frequency = frequency
        self.symbolizer = symbolizer
        self.metrics = metrics
        self.clock = clock
        self.windows: dict[int, Window] = {}
        self.processes: dict[int, ProcessMeta] = {}
        self.kernel_names: OrderedDict[int, str] = OrderedDict()
        self.by_cgroup: dict[int, tuple[tuple, dict]] = {}
        self.by_pid: dict[int, tuple[tuple, dict]] = {}
        self.filtering = False
        self.closed_until_ns = 0

    # --- inputs -------------------------------------------------------------------------------

    def apply_targets(self, body: dict) -> None:
        by_cgroup, by_pid = {}, {}
        for target in body["targets"]:
            labels = {str(k): str(v) for k, v in dict(target["labels"]).items()}
            key = ("target",) + tuple(sorted(labels.items()))
            for c in target.get("cgroup_ids", ()):
                by_cgroup[int(c)] = (key, labels)
            for p in target.get("pids", ()):
                by_pid[int(p)] = (key, labels)
        self.by_cgroup, self.by_pid = by_cgroup, by_pid
        self.filtering = bool(body["filtering"])

    def add_process(self, body: dict) -> None:
        mappings, cache_paths = [], []
        for m in sorted(body["mappings"], key=lambda m: int(m["start"])):
            mappings.append(MappingInfo(int(m["start"]), int(m["limit"]), int(m["offset"]),
                                        str(m["path"]), str(m.get("build_id", ""))))
            cache_paths.append(str(m.get("cache_path", "")))
        pid = int(body["pid"])
        self.processes[pid] = ProcessMeta(
            pid=pid, start_time=int(body["start_time"]), comm=str(body["comm"]),
            executable=str(body["executable"]), mappings=mappings, cache_paths=cache_paths,
            starts=[m.start for m in mappings], last_used=time.monotonic())
        if len(self.processes) > MAX_PROCESSES:
            self._forget_processes()

    def add_samples(self, body: dict) -> None:
        time_ns = int(body["time_ns"])
        now_ns = self.clock()
        if abs(time_ns - now_ns) > 2 * self.duration_ns:
            # A batch stamped far from our clock (a skewed or hostile sender) goes in the window
            # of now, so it can neither open windows that never close nor vanish.
            self._count("batches_out_of_time_total")
            time_ns = now_ns
        window_start = time_ns - time_ns % self.duration_ns
        if window_start < self.closed_until_ns:
            # Its window was already built: put it in the oldest open one rather than lose it.
            self._count("late_batches_total")
            window_start = self.closed_until_ns
        # Check the whole batch before any of it counts: a bad message changes nothing.
        kernel_names = {_address(a): str(n) for a, n in body["kernel_symbols"].items()}
        stacks = [_stack(s) for s in body["stacks"]]
        records = [_record(r, len(stacks)) for r in body["records"]]
        self.kernel_names.update(kernel_names)
        while len(self.kernel_names) > MAX_KERNEL_NAMES:
            self.kernel_names.popitem(last=False)
        window = self.windows.get(window_start)
        if window is None:
            window = self.windows[window_start] = Window(window_start,
                                                         window_start + self.duration_ns)
        targets = window.targets
        total = unmatched = 0
        for pid, tid, cgroup_id, u, k, count in records:
            found = self.by_cgroup.get(cgroup_id) or self.by_pid.get(pid)
            if found is None:
                if self.filtering:
                    unmatched += count
                    continue
                key, labels = ("process", pid), None
            else:
                key, labels = found
            target = targets.get(key)
            if target is None:
                target = targets[key] = Target(key, labels)
            target.stacks[(pid, tid, stacks[u] if u >= 0 else (), stacks[k] if k >= 0 else ())] \
                += count
            target.samples += count
            total += count
        self._count("samples_received_total", total)
        if unmatched:
            self._count("samples_unmatched_total", unmatched)

    # --- outputs ------------------------------------------------------------------------------

    def close_due(self, now_ns: int | None = None, force: bool = False) -> list[dict]:
        """Build the profiles of every window whose end (plus grace) has passed."""
        now_ns = self.clock() if now_ns is None else now_ns
        profiles = []
        for start in sorted(self.windows):
            window = self.windows[start]
            if not force and window.end_ns + GRACE_NS > now_ns:
                break
            del self.windows[start]
            self.closed_until_ns = max(self.closed_until_ns, window.end_ns)
            for target in window.targets.values():
                try:
                    profile = self._finish(window, target)
                except Exception:  # noqa: BLE001 — one bad target must not cost the others
                    self._count("profile_build_failures_total")
                    log.exception("could not build the profile of %s", target.key)
                    continue
                if profile is not None:
                    profiles.append(profile)
            self._count("windows_closed_total")
        return profiles

    def _finish(self, window: Window, target: Target) -> dict | None:
        if target.labels is None:
            pid = target.key[1]
            target.labels = self._process_labels(pid, self.processes.get(pid))
            target.per_process = True
            if not keep(target.labels, self.sampling_ratio):
                self._count("samples_sampled_out_total", target.samples)
                return None
        return self.build_profile(window, target)

    def build_profile(self, window: Window, target: Target) -> dict:
        started = time.perf_counter()
        period_ns = int(1e9 / self.frequency)
        builder = ProfileBuilder(period_ns, window.start_ns, window.end_ns - window.start_ns)
        frames = self._symbolize(target)
        per_process = target.per_process
        for (pid, tid, ustack, kstack), count in target.stacks.items():
            meta = self.processes.get(pid)
            user = []
            for address in ustack:
                i = meta.mapping_of(address) if meta else -1
                if i < 0:
                    user.append((None, address, None))
                else:
                    user.append((meta.mappings[i], address, frames.get((pid, address))))
            kernel = [(a, self.kernel_names.get(a, "[unknown]")) for a in kstack]
            sample_labels = {"thread": tid} if per_process else {"pid": pid, "thread": tid}
            builder.add_sample(user, kernel, count, sample_labels)
        profile = {"id": uuid.uuid4().hex, "labels": target.labels, "start_ns": window.start_ns,
                   "end_ns": window.end_ns, "pprof": builder.build(), "samples": target.samples}
        self._count("profiles_built_total")
        if self.metrics:
            self.metrics.set("profile_build_seconds", time.perf_counter() - started)
        return profile

    def _process_labels(self, pid: int, meta: ProcessMeta | None) -> dict[str, str]:
        return {"node": self.node, "pid": str(pid), "comm": meta.comm if meta else "",
                "executable": meta.executable if meta else ""}

    def _symbolize(self, target: Target) -> dict[tuple[int, int], Frame | None]:
        """Names for every user address of the target, asked once per mapped file."""
        wanted: dict[tuple, tuple[MappingInfo, list[str], list[tuple[int, int]]]] = {}
        for (pid, _tid, ustack, _k) in target.stacks:
            meta = self.processes.get(pid)
            if meta is None or not ustack:
                continue
            meta.last_used = time.monotonic()
            for depth, address in enumerate(ustack):
                i = meta.mapping_of(address)
                if i < 0:
                    continue
                mapping = meta.mappings[i]
                if not mapping.path.startswith("/"):
                    continue
                # A caller's return address points after its call: look up the call itself.
                lookup = address if depth == 0 else address - 1
                entry = wanted.get((pid, i))
                if entry is None:
                    candidates = [p for p in (meta.cache_paths[i], mapping.path) if p]
                    entry = wanted[(pid, i)] = (mapping, candidates, [])
                entry[2].append((address, lookup))
        frames: dict[tuple[int, int], Frame | None] = {}
        for (pid, _i), (mapping, candidates, pairs) in wanted.items():
            found = self.symbolizer.symbolize(mapping, candidates, [lk for _, lk in pairs])
            for address, lookup in pairs:
                frames[(pid, address)] = found.get(lookup)
        return frames

    def _forget_processes(self) -> None:
        cutoff = time.monotonic() - PROCESS_TTL
        for pid in [p for p, m in self.processes.items() if m.last_used < cutoff]:
            del self.processes[pid]
        while len(self.processes) > MAX_PROCESSES:
            oldest = min(self.processes.values(), key=lambda m: m.last_used)
            del self.processes[oldest.pid]

    def _count(self, name: str, amount: float = 1) -> None:
        if self.metrics:
            self.metrics.inc(name, amount)


_U64 = 1 << 64


def _address(value) -> int:
    address = int(value)
    if not 0 <= address < _U64:
        raise ValueError("address out of range")
    return address


def _stack(addresses) -> tuple[int, ...]:
    stack = tuple(int(a) for a in addresses)
    if stack and (min(stack) < 0 or max(stack) >= _U64):
        raise ValueError("address out of range")
    return stack


def _record(record, n_stacks: int) -> tuple[int, int, int, int, int, int]:
    pid, tid, cgroup_id, u, k, count = (int(x) for x in record)
    if not (-1 <= u < n_stacks and -1 <= k < n_stacks and 0 < count < 1 << 32):
        raise ValueError("record out of range")
    return pid, tid, cgroup_id, u, k, count
