"""Samples into targets and windows, and windows into pprof profiles.

Windows are aligned to wall-clock multiples of the profiling duration and a batch of samples
belongs to the window containing the middle of the time it covers (its drain time minus half
the time since the previous drain), so a batch is never split or counted twice. The collector
drains on wall-clock multiples of an interval that divides the window (a second, or the window
split evenly into parts of at most a second): a batch then lies inside one window, the one its
middle names. A window closes once its end plus a grace period has passed, giving batches in
flight time to arrive. This class does no I/O: the service feeds it decoded messages and a
clock.

Ingest is the hot path, so a batch is checked column by column in C (array() for types and
ranges) rather than number by number, and each distinct stack of a window is kept once, as a
small id: a sample's key is five small ints. Building a window's profiles works out each
distinct stack and address once per target, and the symbolizer remembers frames across windows.

A target's profile builder is kept from one window to the next (``TargetState``): addresses it
has seen are not symbolized again, and its tables (locations, functions, mappings) are not
encoded again while no new address comes. Kept states are bounded and started afresh now and
then, so that what a target stopped running does not stay in its profiles for long.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import time
import uuid
from array import array
from collections import Counter, OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import chain, compress, repeat
from operator import add, itemgetter

from services.aggregator.profile_builder import Frame, MappingInfo, ProfileBuilder
from services.aggregator.symbols import Symbolizer
from services.discovery.sampling import keep

log = logging.getLogger("parca_agent.aggregator")

GRACE_NS = 1_500_000_000  # a drain happens every second: wait for the last one of the window
PROCESS_TTL = 300.0  # seconds a process's metadata is kept after its last sample
MAX_PROCESSES = 32768
MAX_KERNEL_NAMES = 500_000
MEMFD_PREFIX = "/memfd:"  # how /proc/<pid>/maps shows memfd_create() mappings
# A target's kept builder: dropped after this many windows without a sample, started afresh
# after this many windows (its profiles carry the locations of every window since it started,
# used or not), or when it holds more locations or layouts than this.
STATE_IDLE_WINDOWS = 3
STATE_RENEW_WINDOWS = 30
STATE_MAX_LOCATIONS = 20_000
STATE_MAX_LAYOUTS = 64
MAX_TARGET_STATES = 4096
# Locations of all kept builders together (a location is ~4 list slots and a dict entry, and
# its share of the kept encoding): the least recently used builders go past it.
MAX_KEPT_LOCATIONS = 1_000_000


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
    # What decides what an address of this process means: its mappings and where their files
    # are read from. Processes with equal layouts (workers forked from one parent) resolve
    # every address alike, so a window works each address out once for all of them.
    layout: tuple = ()
    # The message fields this was made from: the collector repeats every process when a
    # subscriber joins and every minute, and an unchanged one need not be made again.
    source: tuple = ()


@dataclass
class Target:
    key: tuple
    labels: dict[str, str] | None  # None: one process's target, labeled when its window closes
    index: int  # in its window's by_index
    per_process: bool = False
    # Filled in when the window closes: ((index, pid, tid, user stack id, kernel stack id),
    # samples) in the order the stacks first came, and their sum.
    stacks: list[tuple[tuple[int, int, int, int, int], int]] = field(default_factory=list)
    samples: int = 0


@dataclass
class TargetState:
    """What a target's profiles keep from one window to the next."""
    builder: ProfileBuilder
    # id(layout) -> (the layout, kept so that its id stays its own; address -> location id).
    # Only addresses whose meaning is settled: named, or in no file that could name them.
    addresses: dict[int, tuple[tuple, dict[int, int]]] = field(default_factory=dict)
    windows: int = 0
    last_window_ns: int = 0
    # For a per-process target, the start time of the process it was made for: a reused pid
    # starts afresh (its old mappings would stay in the profiles, the first read as the main
    # binary).
    owner: int | None = None
    locations: int = 0  # the builder's locations when last counted in kept_locations


@dataclass
class Window:
    start_ns: int
    end_ns: int
    targets: dict[tuple, Target] = field(default_factory=dict)
    by_index: list[Target] = field(default_factory=list)
    # Each distinct stack of the window once, as an id (0: no stack): a sample's key is then a
    # tuple of five small ints instead of nested tuples of addresses hashed again and again.
    # Dicts keep insertion order and ids count up, so list(stack_ids)[id] is the stack.
    stack_ids: dict[tuple[int, ...], int] = field(default_factory=lambda: {(): 0})
    # (target index, pid, tid, user stack id, kernel stack id) -> samples
    counts: Counter = field(default_factory=Counter)
    _stack_list: list[tuple[int, ...]] | None = None

    def stack_list(self) -> list[tuple[int, ...]]:
        if self._stack_list is None or len(self._stack_list) != len(self.stack_ids):
            self._stack_list = list(self.stack_ids)
        return self._stack_list


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
        # One tuple object per distinct layout, so that a layout is told by its id().
        self._layouts: dict[tuple, tuple] = {}
        self.states: OrderedDict[tuple, TargetState] = OrderedDict()
        self.kept_locations = 0  # the sum of the states' locations
        # Profile ids: random per aggregator start, then counted (a uuid4 per profile cost
        # ~10 us of os.urandom and UUID for hundreds of profiles a window).
        self._id_prefix = uuid.uuid4().hex[:16]
        self._id_numbers = itertools.count()
        self.kernel_names: OrderedDict[int, str] = OrderedDict()
        self.by_cgroup: dict[int, tuple[tuple, dict]] = {}
        self.by_pid: dict[int, tuple[tuple, dict]] = {}
        self.filtering = False
        self.closed_until_ns = 0

    # --- inputs -------------------------------------------------------------------------------

    def apply_targets(self, body: dict) -> None:
        with _overflow_is_value_error():
            self._apply_targets(body)

    def _apply_targets(self, body: dict) -> None:
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
        with _overflow_is_value_error():
            self._add_process(body)

    def _add_process(self, body: dict) -> None:
        source = (body["start_time"], body["comm"], body["executable"], body["mappings"])
        known = self.processes.get(body["pid"])
        if known is not None and known.source == source:
            known.last_used = time.monotonic()
            return
        mappings, cache_paths = [], []
        for m in sorted(body["mappings"], key=lambda m: int(m["start"])):
            start, limit, offset = int(m["start"]), int(m["limit"]), int(m["offset"])
            array("Q", (start, limit, offset))  # OverflowError (a ValueError) outside [0, 2^64)
            mappings.append(MappingInfo(start, limit, offset, str(m["path"]),
                                        str(m.get("build_id", ""))))
            cache_paths.append(str(m.get("cache_path", "")))
        pid = int(body["pid"])
        layout = tuple(zip(mappings, cache_paths))
        layout = self._layouts.setdefault(layout, layout)
        mappings = [m for m, _ in layout]  # the interned layout's own objects
        self.processes[pid] = ProcessMeta(
            pid=pid, start_time=int(body["start_time"]), comm=str(body["comm"]),
            executable=str(body["executable"]), mappings=mappings, cache_paths=cache_paths,
            starts=[m.start for m in mappings], last_used=time.monotonic(),
            layout=layout, source=source)
        if len(self.processes) > MAX_PROCESSES:
            self._forget_processes()
        if len(self._layouts) > 2 * len(self.processes) + 1024:  # keep those still in use
            self._layouts = {m.layout: m.layout for m in self.processes.values()}

    def add_samples(self, body: dict) -> None:
        """Count one batch. A bad batch raises TypeError or ValueError (never OverflowError)
        and changes nothing: the whole batch is checked before any of it counts."""
        with _overflow_is_value_error():
            # The middle of what the batch covers; never more than half a window back, whatever
            # a sender says.
            covered_ns = min(max(int(body["duration_ns"]), 0), self.duration_ns)
            time_ns = int(body["time_ns"]) - covered_ns // 2
            now_ns = self.clock()
            if abs(time_ns - now_ns) > 2 * self.duration_ns:
                # A batch stamped far from our clock (a skewed or hostile sender) goes in the
                # window of now, so it can neither open windows that never close nor vanish.
                self._count("batches_out_of_time_total")
                time_ns = now_ns
            window_start = time_ns - time_ns % self.duration_ns
            if window_start < self.closed_until_ns:
                # Its window was already built: put it in the oldest open one, not lose it.
                self._count("late_batches_total")
                window_start = self.closed_until_ns
            window = self.windows.get(window_start)
            # Check the whole batch before any of it counts: a bad message changes nothing.
            addresses, names = _kernel_symbols(body["kernel_symbols"])
            stacks = body["stacks"]
            ids = _stacks(stacks, window.stack_ids if window is not None else _NO_STACKS)
            columns = _records(body["records"], len(stacks))
        kernel_names = self.kernel_names
        kernel_names.update(zip(addresses, names))
        while len(kernel_names) > MAX_KERNEL_NAMES:
            kernel_names.popitem(last=False)
        if window is None:
            window = self.windows[window_start] = Window(window_start,
                                                         window_start + self.duration_ns)
        if None in ids:
            known = window.stack_ids
            for i, stack in enumerate(stacks):
                if ids[i] is None:
                    ids[i] = known.setdefault(tuple(stack), len(known))
        ids.append(0)  # a record's stack index -1 (no stack) reads this last entry
        if columns is None:
            self._count("samples_received_total", 0)
            return
        pids, tids, cgroup_ids, users, kernels, counts = columns
        # Each record's target, resolved once per distinct pid, or (cgroup, pid) when a
        # cgroup of the batch has a target, in the order they first come (the order the
        # profiles come out).
        by_cgroup = self.by_cgroup
        if by_cgroup and any(map(by_cgroup.__contains__, set(cgroup_ids))):
            pairs = list(zip(cgroup_ids, pids))
            index_of = {pair: self._target_index(window, *pair)
                        for pair in dict.fromkeys(pairs)}
            targets = list(map(index_of.__getitem__, pairs))
            del pairs
        else:
            index_of = {pid: self._target_index(window, None, pid)
                        for pid in dict.fromkeys(pids)}
            targets = list(map(index_of.__getitem__, pids))
        keys = zip(targets, pids, tids, map(ids.__getitem__, users),
                   map(ids.__getitem__, kernels))
        total = sum(counts)
        if None in index_of.values():  # filtering: records of no target are dropped
            kept = [t is not None for t in targets]
            counts = list(compress(counts, kept))
            keys = compress(keys, kept)
            unmatched = total - sum(counts)
            total -= unmatched
            self._count("samples_unmatched_total", unmatched)
        if total == len(counts):  # every count is 1: let Counter count the keys in C
            window.counts.update(keys)
        else:
            window_counts = window.counts
            get = window_counts.get
            for key, count in zip(keys, counts):
                window_counts[key] = get(key, 0) + count
        self._count("samples_received_total", total)

    def _target_index(self, window: Window, cgroup_id: int | None, pid: int) -> int | None:
        found = self.by_cgroup.get(cgroup_id) or self.by_pid.get(pid)
        if found is None:
            if self.filtering:
                return None
            key, labels = ("process", pid), None
        else:
            key, labels = found
        target = window.targets.get(key)
        if target is None:
            target = window.targets[key] = Target(key, labels, len(window.by_index))
            window.by_index.append(target)
        return target.index

    # --- outputs ------------------------------------------------------------------------------

    def next_close_ns(self) -> int | None:
        """Wall-clock ns when the oldest open window is due to close; None with none open."""
        if not self.windows:
            return None
        return min(self.windows) + self.duration_ns + GRACE_NS

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
            by_index = window.by_index
            for key, count in window.counts.items():
                by_index[key[0]].stacks.append((key, count))
            window.counts = Counter()
            for target in window.targets.values():
                target.samples = sum(count for _, count in target.stacks)
                try:
                    profile = self._finish(window, target)
                except Exception:  # noqa: BLE001 — one bad target must not cost the others
                    self._count("profile_build_failures_total")
                    log.exception("could not build the profile of %s", target.key)
                    # Whatever made it fail may be in the kept tables: the next window starts
                    # afresh rather than fail again.
                    self._drop_state(target.key)
                    continue
                finally:
                    target.stacks = []
                if profile is not None:
                    profiles.append(profile)
            self._forget_states(window.start_ns)
            self._count("windows_closed_total")
        return profiles

    def _state(self, target: Target, window: Window, owner: int | None) -> TargetState:
        state = self.states.get(target.key)
        if state is None or state.windows >= STATE_RENEW_WINDOWS or state.owner != owner or (
                state.builder.location_count > STATE_MAX_LOCATIONS
                or len(state.addresses) > STATE_MAX_LAYOUTS):
            self._drop_state(target.key)
            period_ns = int(1e9 / self.frequency)
            state = self.states[target.key] = TargetState(ProfileBuilder(
                period_ns, window.start_ns, window.end_ns - window.start_ns), owner=owner)
            self._bound_states()
        else:
            state.builder.new_window(window.start_ns, window.end_ns - window.start_ns)
        self.states.move_to_end(target.key)
        state.windows += 1
        state.last_window_ns = window.start_ns
        return state

    def _count_locations(self, state: TargetState) -> None:
        """After a build: the state's locations into kept_locations, and the bounds kept."""
        count = state.builder.location_count
        self.kept_locations += count - state.locations
        state.locations = count
        self._bound_states()

    def _bound_states(self) -> None:
        while self.states and (len(self.states) > MAX_TARGET_STATES
                               or self.kept_locations > MAX_KEPT_LOCATIONS):
            self._drop_state(next(iter(self.states)))  # the least recently used

    def _drop_state(self, key: tuple) -> None:
        state = self.states.pop(key, None)
        if state is not None:
            self.kept_locations -= state.locations

    def _forget_states(self, window_start_ns: int) -> None:
        """Drop the states of targets without a sample in the last STATE_IDLE_WINDOWS windows
        (least recently used first, so the scan stops at the first recent one)."""
        cutoff = window_start_ns - STATE_IDLE_WINDOWS * self.duration_ns
        states = self.states
        while states:
            key, state = next(iter(states.items()))
            if state.last_window_ns > cutoff:
                break
            self._drop_state(key)
        if self.metrics:
            self.metrics.set("target_states", len(states))
            self.metrics.set("target_state_locations", self.kept_locations)

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
        owner = None
        if target.per_process:
            meta = self.processes.get(target.key[1])
            owner = meta.start_time if meta is not None else None
        state = self._state(target, window, owner)
        builder = state.builder
        stacks = window.stack_list()
        # The target's samples as columns, in the order they came (the profile's order).
        keys = [key for key, _ in target.stacks]
        if target.per_process:  # one process: one layout group (most targets on a busy host)
            if meta is not None:
                meta.last_used = time.monotonic()
            metas = [meta]
            user_keys = [(0, key[3]) for key in keys]
        else:
            pids = [key[1] for key in keys]
            group_of, metas = self._layout_groups(pids)
            user_keys = list(zip(map(group_of.__getitem__, pids), [key[3] for key in keys]))
        kernel_keys = [key[4] for key in keys]
        # Each layout group's distinct user stacks (0 is the empty stack).
        uids_of: dict[int, list[int]] = {}
        for group, uid in dict.fromkeys(user_keys):
            if uid:
                uids_of.setdefault(group, []).append(uid)
        # Location ids of each distinct stack, worked out once per window and target (a user
        # stack once per address layout: the same addresses mean other code in another
        # layout). Each step is a pass over distinct stacks or addresses, mostly in C; only
        # addresses new to the target's state are symbolized.
        kernel_ids = self._kernel_location_ids(builder, stacks, kernel_keys)
        user_ids = {(group, 0): () for group in range(len(metas))}
        for group, uids in uids_of.items():
            meta = metas[group]
            group_stacks = list(map(stacks.__getitem__, uids))
            known = self._known_addresses(state, meta)
            get = known.get
            ids = [tuple(map(get, stack)) for stack in group_stacks]
            missing = [stack for stack, i in zip(group_stacks, ids) if None in i]
            if missing:
                # Their new addresses, in the order they first come.
                addresses = [a for a in dict.fromkeys(chain.from_iterable(missing))
                             if a not in known]
                mappings, frames = self._symbolize(meta, missing, addresses)
                new = dict(zip(addresses, builder.user_locations(
                    addresses, map(mappings.get, addresses), map(frames.get, addresses))))
                for address, lid in new.items():
                    mapping, frame = mappings.get(address), frames.get(address)
                    if ((frame is not None and frame.function is not None) or mapping is None
                            or not mapping.path.startswith("/")):
                        known[address] = lid  # settled: no later window can name it better
                # Only the gaps of the partial tuples are filled (no copy of every known one).
                ids = [i if None not in i else
                       tuple(new[a] if lid is None else lid for lid, a in zip(i, stack))
                       for stack, i in zip(group_stacks, ids)]
            user_ids.update(zip(zip(repeat(group), uids), ids))
        # A thread's samples are told apart by tid, and in a target of many processes by pid.
        if target.per_process:
            names, values = ("thread",), [key[2:3] for key in keys]
        else:
            names, values = ("pid", "thread"), [key[1:3] for key in keys]
        builder.add_many(map(add, map(kernel_ids.__getitem__, kernel_keys),
                             map(user_ids.__getitem__, user_keys)),
                         [count for _, count in target.stacks], names, values)
        profile = {"id": f"{self._id_prefix}{next(self._id_numbers):016x}",
                   "labels": target.labels, "start_ns": window.start_ns,
                   "end_ns": window.end_ns, "pprof": builder.build(), "samples": target.samples}
        self._count_locations(state)
        self._count("profiles_built_total")
        if self.metrics:
            self.metrics.set("profile_build_seconds", time.perf_counter() - started)
        return profile

    @staticmethod
    def _known_addresses(state: TargetState, meta: ProcessMeta | None) -> dict[int, int]:
        """The state's address -> location id for a layout group's addresses. Processes
        without a message share one: their addresses have no mapping, and mean the same."""
        layout = meta.layout if meta is not None else ()
        entry = state.addresses.get(id(layout))
        if entry is None:
            entry = state.addresses[id(layout)] = (layout, {})
        return entry[1]

    def _kernel_location_ids(self, builder: ProfileBuilder, stacks: list[tuple[int, ...]],
                             kernel_keys: list[int]) -> dict[int, tuple[int, ...]]:
        """kernel stack id -> its location ids, for each distinct id of ``kernel_keys``."""
        distinct = dict.fromkeys(kernel_keys)
        known = builder.kernel_location_ids
        names = self.kernel_names
        for address in dict.fromkeys(chain.from_iterable(map(stacks.__getitem__, distinct))):
            if address not in known:
                builder.kernel_location(address, names.get(address, "[unknown]"))
        get = known.__getitem__
        return {kid: tuple(map(get, stacks[kid])) for kid in distinct}

    def _process_labels(self, pid: int, meta: ProcessMeta | None) -> dict[str, str]:
        return {"node": self.node, "pid": str(pid), "comm": meta.comm if meta else "",
                "executable": meta.executable if meta else ""}

    def _layout_groups(self, pids: list[int]) -> tuple[dict[int, int], list[ProcessMeta | None]]:
        """pid -> layout group, and each group's process (None: a process we have no message
        of, a group on its own). Processes of equal layouts (forked workers) share a group."""
        processes = self.processes
        now = time.monotonic()
        group_of: dict[int, int] = {}
        groups: dict[int | tuple, int] = {}
        metas: list[ProcessMeta | None] = []
        for pid in dict.fromkeys(pids):
            meta = processes.get(pid)
            if meta is not None:
                meta.last_used = now
            # Layouts are interned (_add_process): equal layouts are one object.
            layout = id(meta.layout) if meta is not None else ("pid", pid)
            group = group_of[pid] = groups.setdefault(layout, len(groups))
            if group == len(metas):
                metas.append(meta)
        return group_of, metas

    def _symbolize(self, meta: ProcessMeta | None, group_stacks: list[tuple[int, ...]],
                   addresses: list[int]
                   ) -> tuple[dict[int, MappingInfo], dict[int, Frame | None]]:
        """address -> mapping and address -> frame for the ``addresses`` of one layout group
        (those of its distinct user stacks ``group_stacks``) that are inside a mapping: names
        are asked once per mapped file. (Two dicts rather than one of pairs: no object per
        address for the garbage collector to walk.)"""
        if meta is None:
            return _UNRESOLVED
        # A caller's return address points after its call: look up the call itself. An
        # address seen both innermost and as a caller is looked up as a caller.
        callers = set(chain.from_iterable(map(_TAIL, group_stacks)))
        only_leaves = sorted(set(map(_HEAD, group_stacks)).difference(callers)
                             .intersection(addresses))
        addresses = sorted(addresses)
        mappings: dict[int, MappingInfo] = {}
        frames: dict[int, Frame | None] = {}
        starts = meta.starts
        last = len(starts) - 1
        # Only the mappings that hold an address are visited (a window of a known target
        # brings a few new addresses, a process maps dozens of files): from the lowest address
        # not yet placed, to the mapping starting at or below it and past its addresses.
        lo, n = 0, len(addresses)
        while lo < n:
            i = bisect.bisect_right(starts, addresses[lo]) - 1
            if i < 0:  # below every mapping
                lo = bisect.bisect_left(addresses, starts[0], lo) if starts else n
                continue
            mapping = meta.mappings[i]
            # Its addresses: from its start up to its limit or the next mapping's start,
            # whichever comes first.
            end = mapping.limit if i == last else min(mapping.limit, starts[i + 1])
            hi = bisect.bisect_left(addresses, end, lo)
            start, lo = lo, (n if i == last else bisect.bisect_left(addresses, starts[i + 1], hi))
            if start >= hi:
                continue
            inside = addresses[start:hi]
            mappings.update(zip(inside, repeat(mapping)))
            if not mapping.path.startswith("/"):
                continue
            lookups = list(map(_MINUS_ONE, inside))
            first = bisect.bisect_left(only_leaves, mapping.start)
            for a in only_leaves[first:bisect.bisect_left(only_leaves, end, first)]:
                lookups[bisect.bisect_left(inside, a)] = a
            # A memfd's "path" names no file: only the collector's copy (by build id) can be read.
            host_path = "" if mapping.path.startswith(MEMFD_PREFIX) else mapping.path
            candidates = [p for p in (meta.cache_paths[i], host_path) if p]
            if not candidates:
                continue
            frames.update(zip(inside, self.symbolizer.frames(mapping, candidates, lookups)))
        return mappings, frames

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


_U32 = 1 << 32
_SEQUENCES = frozenset((list, tuple))
_NO_STACKS: dict[tuple[int, ...], int] = {(): 0}
_UNRESOLVED: tuple[dict, dict] = ({}, {})  # the process is unknown: no mapping, no frame
_MINUS_ONE = (1).__rsub__  # a -> a - 1, in C
_HEAD = itemgetter(0)  # a stack's innermost frame
_TAIL = itemgetter(slice(1, None))  # its callers


@contextmanager
def _overflow_is_value_error():
    """array() raises OverflowError for a number outside its type, and int() for an infinite
    float: both are bad input, which the service catches as ValueError."""
    try:
        yield
    except OverflowError as e:
        raise ValueError(f"number out of range: {e}") from None


def _kernel_symbols(symbols) -> tuple[list[int], list[str]]:
    if not isinstance(symbols, dict):
        raise TypeError("kernel_symbols must be a map")
    addresses, names = list(symbols.keys()), list(symbols.values())
    array("Q", addresses)  # TypeError for a non-int, OverflowError outside [0, 2^64)
    if not {str}.issuperset(map(type, names)):
        names = list(map(str, names))
    return addresses, names


def _stacks(stacks, known: dict[tuple[int, ...], int]) -> list[int | None]:
    """The id of each stack already in the window, None for a new one."""
    if type(stacks) not in _SEQUENCES or not _SEQUENCES.issuperset(map(type, stacks)):
        raise TypeError("stacks must be lists of addresses")  # bytes or a str would iterate
    # The tuples live only for the lookup: fewer objects alive, less garbage collector work.
    ids = list(map(known.get, map(tuple, stacks)))
    if None in ids:
        for stack, i in zip(stacks, ids):
            if i is None:
                array("Q", stack)  # TypeError for a non-int, OverflowError outside [0, 2^64)
    # A stack equal to a known one needs no range check, but 4096.0 == 4096: a sum of ints
    # is an int, one float makes it a float (and a string or None raises TypeError).
    if type(sum(map(sum, stacks))) is not int:
        raise TypeError("an address is not an integer")
    return ids


def _records(records, n_stacks: int) -> list[list[int]] | None:
    """The columns (pids, tids, cgroup ids, user stack, kernel stack, counts), or None."""
    if type(records) not in _SEQUENCES or not _SEQUENCES.issuperset(map(type, records)):
        raise TypeError("records must be lists")
    if not records:
        return None
    if set(map(len, records)) != {6}:
        raise ValueError("a record is not 6 numbers")
    # One flat list sliced six ways: faster than zip(*records), and no iterator per record.
    flat = list(chain.from_iterable(records))
    columns = pids, tids, cgroup_ids, users, kernels, counts = [flat[i::6] for i in range(6)]
    # array() raises TypeError for a non-int and OverflowError outside the type's range.
    for column in (pids, tids, cgroup_ids, counts):
        array("Q", column)
    array("q", users)
    array("q", kernels)
    if not (-1 <= min(users) and max(users) < n_stacks and -1 <= min(kernels)
            and max(kernels) < n_stacks and 0 < min(counts) and max(counts) < _U32):
        raise ValueError("record out of range")
    return columns
