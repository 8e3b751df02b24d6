"""What the collector knows of each sampled process, and when to tell subscribers again.

A process is read from /proc when it first appears in samples, again when a sample's user
address falls outside its known mappings (it loaded a library: dlopen) or its start time
changed (the pid was reused). Its metadata is published then, again to every subscriber when
one joins (the collector learns of joins from its XPUB socket: a subscriber that lost messages
subscribes again, as the aggregator does, and so catches up within seconds), and, while it is
being sampled, every REPUBLISH_EVERY seconds, for subscribers that do not.
"""

from __future__ import annotations

import bisect
import math
import os
import stat
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from services.collector import proc
from services.collector.binary_cache import BinaryCache
from services.collector.build_id import BuildIdCache

FORGET_AFTER = 60.0  # a process not sampled for this long is forgotten (bounded memory)
# Every 60 s, as it was, cost ~0.8 ms/s in the collector and the aggregator together with 200
# processes sampled (a message each, read, encoded, sent, received and decoded), to repair a
# loss that a subscriber now repairs itself by subscribing again.
REPUBLISH_EVERY = 300.0
REREAD_MAPS_AFTER = 1.0  # at most one maps re-read a second per process, whatever the samples say
EXEC_RETRY_SECONDS = 0.02  # the wait before reading a process in execve again
EXEC_RETRY_EVERY = 0.2  # at most one such wait per this many seconds
MAX_PROCESSES = 32768
# Whether the unprivileged services can open a mapped file themselves (else it goes to the
# binary cache) takes a stat of the file and of every folder above it: remembered per path and
# file identity for this long, as a process's mappings are mostly the files of the processes
# before it. A permission change is seen this much later.
READABLE_TTL = 60.0
READABLE_MAX = 8192
# Addresses remembered per process as already checked against its mappings (see observe):
# beyond this many the set starts again, so memory stays bounded for a process that runs code
# from everywhere. Starting again costs only the checks this saves.
CHECKED_MAX = 16384
# And across all processes (about 70 bytes each, so ~18 MB at most): past it every set starts
# again, as a host of many long-running processes would otherwise hold CHECKED_MAX each.
CHECKED_BUDGET = 262_144


@dataclass
class ProcessInfo:
    pid: int
    start_time: int
    comm: str
    executable: str
    cmdline: list[str]
    mappings: list[dict]
    starts: list[int] = field(default_factory=list)
    last_seen: float = 0.0
    last_published: float = 0.0
    maps_read_at: float = 0.0
    # Sampled addresses already checked against these mappings: inside one, or outside every
    # one when the maps were read again and had not changed (JIT code, vsyscall). A process
    # keeps running the same code, so most drains check nothing new. Both belong to these
    # mappings: a re-read or a reused pid makes a new ProcessInfo, and starts them empty.
    covered: set[int] = field(default_factory=set)
    outside: set[int] = field(default_factory=set)
    # Stacks (by their content hash: unwound stacks) whose every address is in covered or
    # outside: a drain skips them instead of gathering and comparing their addresses again,
    # which was most of a drain's work with a few hundred processes.
    checked_stacks: set[int] = field(default_factory=set)
    # What the read found, for the unwind loader (taken, then None: see take_maps).
    maps: proc.MapsSnapshot | None = None

    def covers(self, address: int) -> bool:
        i = bisect.bisect_right(self.starts, address) - 1
        return i >= 0 and address < self.mappings[i]["limit"]

    def body(self) -> dict:
        return {"pid": self.pid, "start_time": self.start_time, "comm": self.comm,
                "executable": self.executable, "cmdline": self.cmdline,
                "mappings": self.mappings}


class ProcessTable:
    def __init__(self, proc_path: str, build_ids: BuildIdCache, binaries: BinaryCache | None,
                 metrics=None, republish_every: float = REPUBLISH_EVERY):
        self.proc_path = proc_path
        self.republish_every = max(1.0, republish_every)
        self.build_ids = build_ids
        self.binaries = binaries
        self.metrics = metrics
        self.processes: dict[int, ProcessInfo] = {}
        self._last_retry = -1e9
        # (path, file identity, host namespace) -> (readable, until when that holds)
        self._readable: dict[tuple, tuple[bool, float]] = {}
        self._checked = 0  # addresses added to the checked sets since they were last counted

    def observe(self, pid: int, user_addresses: Iterable[int],
                now: float | None = None) -> dict | None:
        """Note that pid was sampled at these addresses; return its metadata if it must be
        (re)published now, else None."""
        now = time.monotonic() if now is None else now
        info = self.processes.get(pid)
        if info is None:
            info = self._read(pid, now)
            if (info is None and now - self._last_retry >= EXEC_RETRY_EVERY
                    and proc.read_stat(pid, self.proc_path) is not None):
                self._last_retry = now  # bounded: many unreadable processes cannot stall a drain
                # Alive but unreadable: /proc/<pid>/maps refuses readers while the process is
                # in execve. That lasts milliseconds; without this second try its first samples
                # could reach a window's close before its metadata does.
                time.sleep(EXEC_RETRY_SECONDS)
                info = self._read(pid, now)
            if info is None:
                self._count("process_read_failures_total")
                return None
            self._remember(info)
            info.last_seen = info.last_published = now
            return info.body()
        info.last_seen = now
        if now - info.maps_read_at < REREAD_MAPS_AFTER:
            return None
        if not isinstance(user_addresses, (set, frozenset)):
            user_addresses = set(user_addresses)
        unchecked = user_addresses - info.covered - info.outside
        if not unchecked:
            return None
        covered, covers = info.covered, info.covers
        if len(covered) + len(unchecked) > CHECKED_MAX:
            covered.clear()
        unknown = [a for a in unchecked if not covers(a)]
        covered.update(unchecked.difference(unknown))
        self._note_checked(len(unchecked))
        if not unknown:
            return None
        fresh = self._read(pid, now)
        if fresh is None:
            return None
        if fresh.start_time != info.start_time:
            self._count("pid_reuses_total")
        elif [m["start"] for m in fresh.mappings] == info.starts:
            # Outside every file mapping (JIT, vsyscall): not a reason to read the maps again
            # every second while the process keeps running that code; a new address still is.
            info.maps_read_at = now
            if len(info.outside) + len(unknown) > CHECKED_MAX:
                info.outside.clear()
            info.outside.update(unknown)
            return None
        else:
            self._count("process_remaps_total")
        fresh.last_seen = fresh.last_published = now
        self._remember(fresh)
        return fresh.body()

    def only_checked(self, pid: int, stack_ids: Iterable[int | None], now: float) -> bool:
        """The common case of a drain, told without building observe_stacks' pairs: every
        stack of pid (by stable id) was checked before. Then it is only noted as sampled."""
        info = self.processes.get(pid)
        if info is None or not info.checked_stacks or not info.checked_stacks.issuperset(
                stack_ids):  # None (an id that is not stable) is never in the set
            return False
        info.last_seen = now
        return True

    def observe_stacks(self, pid: int, stacks: list[tuple[int | None, Iterable[int]]],
                       now: float | None = None) -> dict | None:
        """observe() for the user stacks of pid in one drain, each (a stable id, i.e. the
        content hash of an unwound stack, or None; its addresses). A stack with an id whose
        addresses were all found inside the mappings, or outside them in maps that had not
        changed, is not looked at again for this process."""
        info = self.processes.get(pid)
        if info is not None and info.checked_stacks:
            checked = info.checked_stacks
            stacks = [s for s in stacks if s[0] is None or s[0] not in checked]
            if not stacks:  # the common case: nothing new, only that it was sampled
                info.last_seen = time.monotonic() if now is None else now
                return None
        addresses: set[int] = set()
        for _, stack in stacks:
            addresses.update(stack)
        body = self.observe(pid, addresses, now)
        info = self.processes.get(pid)  # a new one when the maps were read again
        if info is not None:
            covered, outside, checked = info.covered, info.outside, info.checked_stacks
            if len(checked) >= CHECKED_MAX:
                checked.clear()
            added = 0
            for stack_id, stack in stacks:
                if stack_id is not None and all(a in covered or a in outside for a in stack):
                    checked.add(stack_id)
                    added += 1
            if added:
                self._note_checked(added)
        return body

    def _note_checked(self, added: int) -> None:
        """Keep the checked sets of all processes within CHECKED_BUDGET. The running sum only
        grows (sets shrink when processes are forgotten or read again): recount it once it
        passes the budget, and empty every set if the recount does too."""
        self._checked += added
        if self._checked <= CHECKED_BUDGET:
            return
        self._checked = sum(len(i.covered) + len(i.outside) + len(i.checked_stacks)
                            for i in self.processes.values())
        if self._checked > CHECKED_BUDGET:
            for info in self.processes.values():
                info.covered.clear()
                info.outside.clear()
                info.checked_stacks.clear()
            self._checked = 0
            self._count("checked_addresses_reset_total")

    def due_republish(self, now: float | None = None) -> list[dict]:
        """Metadata of the processes sampled lately that were not published for a while.

        Each is checked first: a process that is gone is not announced again, and one whose
        start time changed (the pid was reused) is read afresh.
        """
        now = time.monotonic() if now is None else now
        due = []
        for pid, info in list(self.processes.items()):
            if now - info.last_seen >= FORGET_AFTER or \
                    now - info.last_published < self.republish_every:
                continue
            info.last_published = now
            st = proc.read_stat(pid, self.proc_path)
            if st is None:
                continue
            if st.start_time != info.start_time:
                fresh = self._read(pid, now)
                if fresh is None:
                    continue
                self._count("pid_reuses_total")
                fresh.last_seen = info.last_seen
                fresh.last_published = now
                self._remember(fresh)
                info = fresh
            due.append(info.body())
        return due

    def republish_all_soon(self) -> None:
        """Make every process sampled lately due for due_republish (a subscriber joined)."""
        for info in self.processes.values():
            info.last_published = -math.inf

    def forget_idle(self, now: float | None = None) -> list[int]:
        """Drop the processes not sampled for FORGET_AFTER; their pids."""
        now = time.monotonic() if now is None else now
        idle = [pid for pid, i in self.processes.items() if now - i.last_seen >= FORGET_AFTER]
        for pid in idle:
            del self.processes[pid]
        return idle

    def _remember(self, info: ProcessInfo) -> None:
        self.processes[info.pid] = info
        if len(self.processes) > MAX_PROCESSES:
            oldest = min(self.processes.values(), key=lambda i: i.last_seen)
            del self.processes[oldest.pid]

    def _read(self, pid: int, now: float) -> ProcessInfo | None:
        st = proc.read_stat(pid, self.proc_path)
        entries = proc.read_maps(pid, self.proc_path)
        if st is None or entries is None:
            return None
        host_ns = proc.same_mount_namespace(pid, self.proc_path)
        files: dict[int, tuple[str, tuple | None]] = {}
        mappings = [self._mapping(pid, e, host_ns, now, files) for e in entries]
        mappings.sort(key=lambda m: m["start"])
        return ProcessInfo(pid=pid, start_time=st.start_time, comm=st.comm,
                           executable=proc.read_exe(pid, self.proc_path),
                           cmdline=proc.read_cmdline(pid, self.proc_path), mappings=mappings,
                           starts=[m["start"] for m in mappings], maps_read_at=now,
                           maps=proc.MapsSnapshot(st.start_time, now, tuple(entries), files))

    def take_maps(self, pid: int) -> proc.MapsSnapshot | None:
        """The maps just read for pid, once (they are not kept: the loader wants them fresh)."""
        info = self.processes.get(pid)
        if info is None:
            return None
        maps, info.maps = info.maps, None
        return maps

    def _mapping(self, pid: int, entry: proc.MapEntry, host_ns: bool, now: float,
                 files: dict) -> dict:
        mapping = {"start": entry.start, "limit": entry.limit, "offset": entry.offset,
                   "path": entry.path, "build_id": "", "cache_path": ""}
        if not entry.path.startswith("/"):
            return mapping  # [vdso]
        source = proc.mapped_file_path(pid, entry, self.proc_path)
        build_id, ident = files[entry.start] = self.build_ids.lookup(source)
        mapping["build_id"] = build_id
        if build_id and self.binaries is not None and not self._can_read(entry.path, ident,
                                                                         host_ns, now):
            self.binaries.request(build_id, source)
            mapping["cache_path"] = self.binaries.path_for(build_id)
        return mapping

    def _can_read(self, path: str, ident: tuple | None, host_ns: bool, now: float) -> bool:
        """_agent_can_read, remembered for READABLE_TTL seconds."""
        key = (path, ident, host_ns)
        known = self._readable.get(key)
        if known is not None and now < known[1]:
            return known[0]
        if len(self._readable) >= READABLE_MAX:
            self._readable.clear()
        readable = _agent_can_read(path, ident, host_ns)
        self._readable[key] = (readable, now + READABLE_TTL)
        return readable

    def _count(self, name: str) -> None:
        if self.metrics:
            self.metrics.inc(name)


def _agent_can_read(path: str, ident: tuple | None, host_ns: bool) -> bool:
    """True when the unprivileged services can open the same file at the same path themselves."""
    if not host_ns or ident is None:
        return False
    try:
        st = os.stat(path)
    except OSError:
        return False
    if (st.st_dev, st.st_ino) != ident[:2] or not st.st_mode & stat.S_IROTH:
        return False
    # Every folder on the way must let others through, or the agent's user cannot open it.
    parent = os.path.dirname(path)
    while parent not in ("/", ""):
        try:
            if not os.stat(parent).st_mode & stat.S_IXOTH:
                return False
        except OSError:
            return False
        parent = os.path.dirname(parent)
    return True
