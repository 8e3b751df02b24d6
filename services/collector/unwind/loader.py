"""Loads the unwind tables of sampled processes into the BPF maps, and drops them again.

A process gets its tables when it first appears in samples (or maps new files): every
executable mapping gets the table of its file, built or taken from the cache, placed once in
the shared row array however many processes map it. When a process exits (a pidfd per process
tells, checked every few seconds) its mappings go, and a file's rows go with its last process.
Until a process's tables are in place its samples keep the frame-pointer walk.

Building a table takes up to seconds for a large binary (python3.11: 0.5 s, gcc's cc1: 3 s), so
the work runs in one background thread; the collector's loop only hands it pids with their
sample counts, and the busiest waiting process is served first (a burst of short-lived
compilers must not keep a long-running service waiting). Everything that changes the tables'
state runs in that thread (or in a test's own thread); only the waiting set is shared.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from services.collector import proc
from services.collector.build_id import BuildIdCache
from services.collector.exit_watch import ExitWatch
from services.collector.unwind.table_store import TableStore
from services.collector.unwind.tables import (
    DEFAULT_CACHE_BYTES,
    RangeAllocator,
    TableCache,
)

log = logging.getLogger("parca_agent.collector.unwind")

# Seconds between checks for exited processes: a check asks the exit watch (one syscall), and
# reads the stat of the processes it could not watch; a late one only keeps rows a little
# longer (a reused pid is reloaded as soon as it is sampled, without waiting for this).
PRUNE_EVERY = 5.0
WAITING_MAX = 4096  # pids waiting for tables; beyond, requests are dropped and counted
# Seconds a process table's reading of a process's maps is used instead of reading them again
# (a process that maps more later is requested again, with what the table read then).
MAPS_FRESH = 10.0


@dataclass
class ResidentTable:
    """A file's rows in the BPF row array."""
    first_row: int
    rows: int
    # Names this placement in the BPF row cache, keyed by (table_id, address): a new id for
    # every placement, so rows cached for a table whose slice was reused never match again.
    table_id: int
    users: set[int] = field(default_factory=set)


@dataclass
class LoadedProcess:
    start_time: int
    first_mapping: int
    mappings: int
    files: list[str]


class UnwindLoader:
    def __init__(self, sampler, proc_path: str = "/proc", metrics=None,
                 cache_bytes: int = DEFAULT_CACHE_BYTES, store_dir: str | None = None):
        """store_dir: where built tables are kept across restarts (None: memory only)."""
        from services.collector.bpf_program import UNWIND_MAPPINGS_MAX, UNWIND_ROWS_MAX

        self.sampler = sampler
        self.proc_path = proc_path
        self.metrics = metrics
        store = TableStore(store_dir, metrics=metrics) if store_dir else None
        self.tables = TableCache(cache_bytes, store=store)
        self.build_ids = BuildIdCache()
        self.rows = RangeAllocator(UNWIND_ROWS_MAX)
        self.mapping_slots = RangeAllocator(UNWIND_MAPPINGS_MAX)
        self.resident: dict[str, ResidentTable] = {}
        self._placements = 0  # tables placed so far: the source of table ids
        self.processes: dict[int, LoadedProcess] = {}
        # pidfds only name processes of this pid namespace, which /proc is.
        self.exits = ExitWatch() if proc_path == "/proc" else None
        self._waiting: dict[int, int] = {}  # pid -> samples seen while waiting
        self._maps: dict[int, proc.MapsSnapshot] = {}  # what the requester read, by waiting pid
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._stats: dict[str, int] = {}

    # --- called from the collector's loop --------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="unwind-loader", daemon=True)
        self._thread.start()

    def request(self, pid: int, samples: int = 1, maps: proc.MapsSnapshot | None = None) -> None:
        """Load (or reload, after a remap) pid's tables soon; busier processes first. ``maps``:
        what the caller just read of the process, used unless it is stale by then."""
        with self._wake:
            if pid not in self._waiting and len(self._waiting) >= WAITING_MAX:
                self._count("unwind_load_requests_dropped_total")
                return
            self._waiting[pid] = self._waiting.get(pid, 0) + samples
            if maps is not None:
                self._maps[pid] = maps
            else:
                self._maps.pop(pid, None)
            self._wake.notify()

    def note_samples(self, samples: dict[int, int]) -> None:
        """Samples of this drain by pid: waiting processes that keep running move up."""
        with self._wake:
            for pid in self._waiting.keys() & samples.keys():
                self._waiting[pid] += samples[pid]

    def stop(self) -> None:
        if self._thread is not None:
            with self._wake:
                self._stopping = True
                self._wake.notify()
            self._thread.join(timeout=10)
            if self._thread.is_alive():
                return  # still busy with a table: it keeps what it uses (a daemon thread)
            self._thread = None
        if self.exits is not None:
            self.exits.close()
            self.exits = None

    def report(self) -> None:
        """Kernel-side walk counters as metrics: unwind_<name>_total, plus table gauges."""
        if self.metrics is None:
            return
        current = self.sampler.read_unwind_stats()
        for name, value in current.items():
            delta = value - self._stats.get(name, 0)
            if delta > 0:
                self.metrics.inc(f"unwind_{name}_total", delta)
        self._stats = current
        self.metrics.set("unwind_processes", len(self.processes))
        self.metrics.set("unwind_tables_resident", len(self.resident))
        self.metrics.set("unwind_rows_free", self.rows.available)
        self.metrics.set("unwind_table_cache_bytes", self.tables.bytes)

    # --- the work (the loader thread) ------------------------------------------------------

    def _next(self, timeout: float) -> tuple[int, proc.MapsSnapshot | None] | None:
        """The busiest waiting pid with the maps its requester read (pid -1 when none came
        within timeout), None to stop."""
        with self._wake:
            if not self._waiting and not self._stopping:
                self._wake.wait(timeout)
            if self._stopping:
                return None
            if not self._waiting:
                return -1, None
            pid = max(self._waiting, key=self._waiting.__getitem__)
            del self._waiting[pid]
            return pid, self._maps.pop(pid, None)

    def _run(self) -> None:
        next_prune = time.monotonic() + PRUNE_EVERY
        while True:
            job = self._next(max(0.05, next_prune - time.monotonic()))
            if job is None:
                return
            pid, maps = job
            try:
                if pid >= 0:
                    self.load(pid, maps)
                if time.monotonic() >= next_prune:
                    self.prune()
                    next_prune = time.monotonic() + PRUNE_EVERY
            except Exception:  # one bad process or file must not end unwinding for all
                log.exception("unwind table loading failed for pid %d", pid)
                self._count("unwind_load_errors_total")

    def load(self, pid: int, maps: proc.MapsSnapshot | None = None) -> bool:
        """Give pid its tables in BPF; False when it is gone or has nothing to unwind. ``maps``:
        the process's maps as read lately, used when they belong to the same process (its
        start time) and are fresh, instead of reading them and their files' identities again."""
        # Watched before its stat is read (see ExitWatch.watch). A reload watches again.
        if self.exits is not None:
            self.exits.watch(pid)
        st = proc.read_stat(pid, self.proc_path)
        known: dict[int, tuple[str, tuple | None]] = {}
        if st is None:
            entries = None
        elif (maps is not None and maps.start_time == st.start_time
                and time.monotonic() - maps.read_at < MAPS_FRESH):
            entries, known = maps.entries, maps.files
            self._count("unwind_maps_reused_total")
        else:
            entries = proc.read_maps(pid, self.proc_path)
        if st is None or entries is None or not entries:
            self._unwatch(pid)
            return False
        started = time.perf_counter()
        mappings, files = [], []
        for entry in sorted(entries, key=lambda e: e.start):
            first_row, rows, bias, table_id = 0, 0, 0, 0
            if entry.path.startswith("/"):
                placed = self._place(pid, entry, known.get(entry.start))
                if placed is not None:
                    key, resident, bias = placed
                    first_row, rows, table_id = resident.first_row, resident.rows, \
                        resident.table_id
                    files.append(key)
            mappings.append((entry.start, entry.limit, bias, first_row, rows, table_id))
        first = self.mapping_slots.allocate(len(mappings))
        if first is None:
            self._release_files(pid, files)
            self._unwatch(pid)
            self._count("unwind_mapping_slots_full_total")
            return False
        self.sampler.write_unwind_mappings(first, mappings)
        self.sampler.set_unwind_process(pid, first, len(mappings))
        old = self.processes.get(pid)
        self.processes[pid] = LoadedProcess(st.start_time, first, len(mappings), files)
        if old is not None:  # a reload: the new entry is live, the old slices can go
            self.mapping_slots.release(old.first_mapping, old.mappings)
            self._release_files(pid, [f for f in old.files if f not in files])
        self._count("unwind_processes_loaded_total")
        took = time.perf_counter() - started
        log.debug("unwind tables for pid %d: %d mappings, %d files in %.2fs", pid,
                  len(mappings), len(set(files)), took)
        if self.metrics is not None:
            self.metrics.set("unwind_last_load_seconds", took)
        return True

    def _unwatch(self, pid: int) -> None:
        """Stop watching pid: it was dropped, or its load failed (then a process loaded
        earlier under this pid, maybe another one, is left to prune's stat check, which tells
        them apart by start time)."""
        if self.exits is not None:
            self.exits.unwatch(pid)

    def drop(self, pid: int) -> None:
        loaded = self.processes.pop(pid, None)
        if loaded is None:
            return
        self._unwatch(pid)
        self.sampler.drop_unwind_process(pid)
        self.mapping_slots.release(loaded.first_mapping, loaded.mappings)
        self._release_files(pid, loaded.files)

    def prune(self) -> int:
        """Drop the processes that exited (or whose pid now names another process)."""
        exits = self.exits
        gone = set(exits.exited()) if exits is not None else set()
        for pid, loaded in self.processes.items():
            if pid in gone or (exits is not None and exits.watched(pid)):
                continue
            st = proc.read_stat(pid, self.proc_path)
            if st is None or st.start_time != loaded.start_time:
                gone.add(pid)
        for pid in gone:
            self.drop(pid)
        if self.metrics is not None and exits is not None:
            self.metrics.set("unwind_processes_watched", len(exits))
        return len(gone)

    def _place(self, pid: int, entry: proc.MapEntry,
               known: tuple[str, tuple | None] | None = None
               ) -> tuple[str, ResidentTable, int] | None:
        """(file key, its resident table, bias) of the mapping's table, now in BPF. ``known``:
        the file's (build id, identity) when the caller has them."""
        source = proc.mapped_file_path(pid, entry, self.proc_path)
        build_id, ident = known if known is not None else self.build_ids.lookup(source)
        if not build_id and ident is None:
            return None
        key = build_id or "file:" + ":".join(map(str, ident))
        table = self.tables.get(key, source)
        if table is None or table.count == 0:
            return None
        vaddr = table.vaddr(entry.offset)
        if vaddr is None:
            return None
        bias = entry.start - vaddr
        resident = self.resident.get(key)
        if resident is None:
            first = self.rows.allocate(table.count)
            if first is None:
                self._count("unwind_rows_full_total")
                return None
            self.sampler.write_unwind_rows(first, table.rows)
            self._placements += 1
            resident = self.resident[key] = ResidentTable(first, table.count,
                                                          self._placements % 0xFFFFFFFF + 1)
        resident.users.add(pid)
        return key, resident, bias

    def _release_files(self, pid: int, files: list[str]) -> None:
        for key in files:
            resident = self.resident.get(key)
            if resident is None:
                continue
            resident.users.discard(pid)
            if not resident.users:
                # Rows stay in the array until reused: no process points at them any more.
                self.rows.release(resident.first_row, resident.rows)
                del self.resident[key]

    def _count(self, name: str) -> None:
        if self.metrics is not None:
            self.metrics.inc(name)

