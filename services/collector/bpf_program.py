"""bpf/cpu_sample.c in the kernel: attached to cpu-clock on every CPU, its maps drained.

BCC compiles and loads the program in a short-lived child (services/collector/loader.py), so
this long-running process never maps LLVM; it opens the perf events, attaches the program and
reads and writes the maps with plain bpf() calls (bpf_syscalls.py), in reused buffers unpacked
with ``struct``: the drain runs every second and must cost less than `perf record`.
"""

from __future__ import annotations

import ctypes as ct
import errno
import importlib.util
import logging
import os
import struct
from pathlib import Path

from services.collector import bpf_syscalls as bs
from services.collector.loader import LoadError, load

BPF_SOURCE = Path(__file__).resolve().parents[2] / "bpf" / "cpu_sample.c"

log = logging.getLogger("parca_agent.collector.bpf")

COUNTS_MAX = 65536  # distinct (pid, tid, cgroup, stacks) per drain interval before samples are lost
# The count map is sized for what the CPUs can sample in COUNTS_HEADROOM_S seconds (a drain
# comes every second), within [COUNTS_MIN, COUNTS_MAX]: every drain's batch call walks every
# bucket, and empty ones cost for nothing (16384 took ~0.15 ms a drain here, a tenth of the
# drain). The unwound-stack map, drained the same way, holds at most one stack per count and
# gets the same size.
COUNTS_MIN = 4096
COUNTS_HEADROOM_S = 16
STACKS_MAX = 16384  # distinct stacks per drain; more raise the chance of -EEXIST collisions
FILTER_MAX = 16384  # cgroups and pids to profile
KNOWN_PIDS_MAX = 16384  # processes the kernel side knows the collector has read (LRU)
NEW_PIDS_MAX = 1024  # new processes between two checks (a second); more wait for a drain
MAX_DEPTH = 127  # the kernel's PERF_MAX_STACK_DEPTH default, what bpf_get_stackid records

# .eh_frame unwinding (bpf/cpu_sample.c), --dwarf-unwind:
UNWIND_ROWS_MAX = 1 << 20  # rows of every loaded table together: 8 MB of kernel memory
UNWIND_PROCESSES_MAX = 4096  # processes with tables at once (8 KB each, allocated on use)
UNWIND_MAPPINGS_MAX = 65536  # mappings of every process with tables together: 2.5 MB
# Rows found lately, per CPU, direct-mapped (16 bytes a slot: 64 KB a CPU). What runs hot on
# one CPU is a few hundred distinct pcs.
ROW_CACHE_SLOTS = 4096  # a power of two
# Stack ids of unwound user stacks: their unwound_stacks key plus this, apart from the
# stack_traces ids (0 .. STACKS_MAX) in the same place of CountEntry.
UNWOUND_STACK_BASE = 1 << 32
UNWOUND_DRAIN_CHUNK = 256  # unwound stacks per batch call: 256 KB of buffer

KEY = struct.Struct("<IIQiiQ")  # struct sample_key
VALUE = struct.Struct("<Q")
STACK = struct.Struct(f"<{MAX_DEPTH}Q")
UNWOUND_STACK = struct.Struct(f"<Q{MAX_DEPTH}Q")  # struct unwound_stack: len, addresses
_ADDRESSES = [struct.Struct(f"<{n}Q") for n in range(MAX_DEPTH + 1)]  # n addresses, by n
UNWIND_MAPPING = struct.Struct("<QQQIII4x")  # struct unwind_mapping (padded to 8 bytes)
UNWIND_PROCESS = struct.Struct("<II")  # struct unwind_process
UNWIND_ROW_SIZE = 8

# The order of enum problem in bpf/cpu_sample.c.
PROBLEM_NAMES = (
    "samples_seen",
    "samples_filtered",
    "user_stack_collisions",
    "kernel_stack_collisions",
    "user_stack_faults",
    "kernel_stack_faults",
    "count_map_full",
    "stack_other_errors",
)

# The order of enum unwind_stat in bpf/cpu_sample.c (index 0 is unused).
UNWIND_STAT_NAMES = (
    "",
    "stacks",
    "end_outermost",
    "end_no_mapping",
    "end_not_covered",
    "end_unsupported",
    "end_read_fault",
    "end_truncated",
    "fp_steps",
    "kernel_mode",
    "no_user_regs",
    "stack_map_full",
    "row_cache_hits",
    "row_searches",
)


def counts_capacity(frequency: int, cpus: int) -> int:
    """Entries of the count map: a power of two (the kernel rounds its buckets up to one)
    holding COUNTS_HEADROOM_S seconds of samples that all differ, within the bounds."""
    wanted = max(1, frequency * cpus * COUNTS_HEADROOM_S)
    return min(COUNTS_MAX, max(COUNTS_MIN, 1 << (wanted - 1).bit_length()))


class BpfUnavailable(Exception):
    """BPF cannot run here; the message names the problem and the fix, in one line."""


def check_environment() -> None:
    """Refuse early, with one line, where the program cannot load."""
    if os.geteuid() != 0:
        raise BpfUnavailable("the collector must run as root (or with CAP_BPF and CAP_PERFMON) "
                             "to load BPF programs; start it as root")
    if importlib.util.find_spec("bcc") is None:  # found, not imported: that would map LLVM here
        raise BpfUnavailable("the bcc Python module is missing: install Debian's python3-bpfcc "
                             "(make run does) and use a venv with system site packages") from None
    build = f"/lib/modules/{os.uname().release}/build"
    if not os.path.exists(build):
        raise BpfUnavailable(f"no kernel headers at {build}: install linux-headers-$(uname -r) "
                             "or run make run, which links Debian's linux-headers-amd64")
    if not os.path.exists("/sys/kernel/btf/vmlinux") and not os.path.isdir("/sys/fs/bpf"):
        raise BpfUnavailable("this kernel shows no BPF support (no /sys/fs/bpf): "
                             "a kernel built with CONFIG_BPF_SYSCALL is needed")


# One drained count: (pid, tid, cgroup_id, user_stack_id, kernel_stack_id, count). Plain
# tuples: building a named tuple or dataclass per entry costs more than its unpacking.
CountEntry = tuple[int, int, int, int, int, int]


MAPS = ("counts", "stack_traces", "filter_cgroups", "filter_pids", "filter_enabled", "problems",
        "known_pids", "new_pids", "new_pid_events")
UNWIND_MAPS = ("unwind_rows", "unwind_mappings", "unwind_processes", "unwound_stacks",
               "unwind_stats", "unwind_programs")


class CpuSampler:
    """The loaded program: perf events attached, maps open."""

    def __init__(self, frequency: int, unwind: bool = True):
        check_environment()
        self.unwinding = unwind
        self.counts_max = counts_capacity(frequency, len(bs.online_cpus()))
        while True:
            try:
                loaded = self._load(self.unwinding, self.counts_max)
                break
            except LoadError as e:
                if not self.unwinding:
                    raise BpfUnavailable(f"could not load {BPF_SOURCE.name}: {e} (check the "
                                         "kernel headers link and dmesg)") from None
                # The walker needs tail calls, BTF task helpers and a verifier that takes it:
                # frame pointers still work without it.
                log.warning("the .eh_frame unwinder did not load (%s); frame pointers only", e)
                self.unwinding = False
        self._loaded = loaded
        self._events: list[int] = []
        try:
            for cpu in bs.online_cpus():
                fd = bs.open_cpu_clock(cpu, frequency)
                self._events.append(fd)
                bs.attach_and_enable(fd, loaded.programs["on_cpu_sample"])
        except OSError as e:
            self.close()
            raise BpfUnavailable(f"cannot open cpu-clock perf events: {e.strerror} "
                                 "(is perf_event_paranoid or a seccomp profile in the way?)") from None
        maps = loaded.maps
        self.counts = maps["counts"]
        self.stacks = maps["stack_traces"]
        self.problems = maps["problems"]
        self.filter_cgroups = maps["filter_cgroups"]
        self.filter_pids = maps["filter_pids"]
        self.filter_enabled = maps["filter_enabled"]
        self.known_pids = maps["known_pids"]
        self.new_pids = maps["new_pids"]
        # Readable (poll) once a process is new to the kernel side: take_new_pids then.
        self.new_process_signal = loaded.rings["new_pid_events"]
        self._new_keys = ct.create_string_buffer(4 * NEW_PIDS_MAX)
        self._new_values = ct.create_string_buffer(4 * NEW_PIDS_MAX)
        if self.unwinding:
            self.unwind_rows = maps["unwind_rows"]
            self.unwind_processes = maps["unwind_processes"]
            self.unwind_mappings = maps["unwind_mappings"]
            self.unwound_stacks = maps["unwound_stacks"]
            self.unwind_stats = maps["unwind_stats"]
            self._unwound_buf = ct.create_string_buffer(UNWOUND_STACK.size)
            self._unwound_keys = ct.create_string_buffer(8 * UNWOUND_DRAIN_CHUNK)
            self._unwound_values = ct.create_string_buffer(UNWOUND_STACK.size
                                                           * UNWOUND_DRAIN_CHUNK)
        self._unwound_now: dict[int, list[int]] = {}
        self._unwound_before: dict[int, list[int]] = {}
        # Reused buffers: allocating 65536 keys every second would dominate the drain.
        self._keys = ct.create_string_buffer(KEY.size * self.counts_max)
        self._values = ct.create_string_buffer(VALUE.size * self.counts_max)
        self._stack_buf = ct.create_string_buffer(STACK.size)
        self._batch_ok = True
        self.filtered_cgroups: set[int] = set()
        self.filtered_pids: set[int] = set()

    @staticmethod
    def _load(unwind: bool, counts_max: int = COUNTS_MAX):
        cflags = [f"-DCOUNTS_MAX={counts_max}", f"-DSTACKS_MAX={STACKS_MAX}",
                  f"-DUNWOUND_STACKS_MAX={counts_max}",
                  f"-DFILTER_MAX={FILTER_MAX}", f"-DKNOWN_PIDS_MAX={KNOWN_PIDS_MAX}",
                  f"-DNEW_PIDS_MAX={NEW_PIDS_MAX}", f"-DDWARF_UNWIND={int(unwind)}"]
        maps, tail_calls = list(MAPS), []
        if unwind:
            cflags += [f"-DUNWIND_ROWS_MAX={UNWIND_ROWS_MAX}",
                       f"-DUNWIND_MAPPINGS_MAX={UNWIND_MAPPINGS_MAX}",
                       f"-DUNWIND_PROCESSES_MAX={UNWIND_PROCESSES_MAX}",
                       f"-DROW_CACHE_SLOTS={ROW_CACHE_SLOTS}"]
            maps += UNWIND_MAPS
            tail_calls = [("unwind_programs", 0, "unwind_user_stack")]
        return load(BPF_SOURCE.read_text(), cflags, ["on_cpu_sample"], maps, tail_calls)

    def drain_counts(self) -> list[CountEntry]:
        """Take every count out of the kernel map (lookup-and-delete); an unwound user
        stack's id is UNWOUND_STACK_BASE + its hash."""
        if self._batch_ok:
            try:
                return self._drain_batch()
            except OSError as e:
                if e.errno not in (errno.EINVAL, errno.ENOTSUPP if hasattr(errno, "ENOTSUPP") else 524,
                                   errno.EOPNOTSUPP):
                    raise
                self._batch_ok = False  # an older kernel: iterate-and-delete from now on
        return self._drain_iterate()

    def _drain_batch(self) -> list[CountEntry]:
        total = self.counts.lookup_and_delete_batch(self._keys, self._values)
        if self.unwinding:
            self._drain_unwound_stacks()
        # Only the filled part: .raw would copy the whole 2.5 MB of buffers every drain.
        keys = ct.string_at(self._keys, KEY.size * total)
        values = ct.string_at(self._values, VALUE.size * total)
        base = UNWOUND_STACK_BASE
        return [(pid, tid, cgroup, base + unwound if unwound else user, kernel, count)
                for (pid, tid, cgroup, user, kernel, unwound), (count,)
                in zip(KEY.iter_unpack(keys), VALUE.iter_unpack(values))]

    def _drain_iterate(self) -> list[CountEntry]:
        entries = []
        for key in self.counts.keys():
            value = self.counts.lookup(key)
            if value is None or not self.counts.delete(key):
                continue
            pid, tid, cgroup, user, kernel, unwound = KEY.unpack(key)
            if unwound:
                user = UNWOUND_STACK_BASE + unwound
            entries.append((pid, tid, cgroup, user, kernel, VALUE.unpack(value)[0]))
        return entries

    def take_new_pids(self) -> dict[int, int]:
        """Processes sampled since the last call that are not marked known (see mark_known),
        with their samples since they were listed; taken out of the kernel's list."""
        if self._batch_ok:
            try:
                n = self.new_pids.lookup_and_delete_batch(self._new_keys, self._new_values)
                pids = struct.unpack(f"<{n}I", ct.string_at(self._new_keys, 4 * n))
                counts = struct.unpack(f"<{n}I", ct.string_at(self._new_values, 4 * n))
                return dict(zip(pids, counts))
            except OSError as e:
                if e.errno not in (errno.EINVAL, 524, errno.EOPNOTSUPP):
                    raise
                self._batch_ok = False
        found = {}
        for key in self.new_pids.keys():
            value = self.new_pids.lookup(key)
            if value is not None and self.new_pids.delete(key):
                found[struct.unpack("<I", key)[0]] = struct.unpack("<I", value)[0]
        return found

    def mark_known(self, pids: list[int]) -> None:
        """These processes' /proc has been read: their samples stop announcing them."""
        if not pids:
            return
        if self._batch_ok:
            try:
                self.known_pids.update_batch(struct.pack(f"<{len(pids)}I", *pids),
                                             b"\x01" * len(pids), len(pids))
                return
            except OSError as e:
                if e.errno not in (errno.EINVAL, 524, errno.EOPNOTSUPP):
                    raise
                self._batch_ok = False
        for pid in pids:
            self.known_pids.update(struct.pack("<I", pid), b"\x01")

    def forget_known(self, pids: list[int]) -> None:
        """These processes were forgotten: a process that takes one of their pids is
        announced again."""
        for pid in pids:
            self.known_pids.delete(struct.pack("<I", pid))

    def take_stack(self, stack_id: int) -> list[int] | None:
        """The addresses of one stack, innermost first; the stack is deleted from the map
        (BCC's StackTrace.clear() does nothing, so without this the map fills up)."""
        if stack_id >= UNWOUND_STACK_BASE:
            return self._take_unwound(stack_id - UNWOUND_STACK_BASE)
        key = struct.pack("<i", stack_id)
        if not self.stacks.take_into(key, self._stack_buf):
            return None
        addresses = STACK.unpack(self._stack_buf.raw)
        n = addresses.index(0) if 0 in addresses else MAX_DEPTH
        return list(addresses[:n])

    def _take_unwound(self, stack_hash: int) -> list[int] | None:
        if not self.unwinding:
            return None
        for batch in (self._unwound_now, self._unwound_before):
            addresses = batch.pop(stack_hash, None)
            if addresses is not None:
                return addresses
        # Not in the last two batch drains (a sample between them): fetch it alone.
        if not self.unwound_stacks.take_into(struct.pack("<Q", stack_hash), self._unwound_buf):
            return None
        n, *addresses = UNWOUND_STACK.unpack(self._unwound_buf.raw)
        return addresses[: min(n, MAX_DEPTH)]

    def _drain_unwound_stacks(self) -> None:
        """Move every unwound user stack out of the kernel in a few batch calls instead of two
        calls per stack. Called after the counts' drain, so every stack a drained count names
        is here; stacks of samples counted after that wait one drain for their counts. Keys
        are content hashes, so a stack taken early is still the right one."""
        self._unwound_before = self._unwound_now  # leftovers live one more drain, then go
        taken: dict[int, list[int]] = {}
        chunk = UNWOUND_DRAIN_CHUNK
        while True:
            n, ended = self.unwound_stacks.take_batch(self._unwound_keys, self._unwound_values,
                                                      chunk)
            keys = ct.string_at(self._unwound_keys, 8 * n)
            values = ct.string_at(self._unwound_values, UNWOUND_STACK.size * n)
            for j, (key,) in enumerate(struct.iter_unpack("<Q", keys)):
                base = j * UNWOUND_STACK.size
                depth = min(struct.unpack_from("<Q", values, base)[0], MAX_DEPTH)
                # Only the frames the walk filled: most stacks are far shorter than 127.
                taken[key] = list(_ADDRESSES[depth].unpack_from(values, base + 8))
            if n == 0 or ended:  # not another walk of every bucket to learn it is empty
                break
        self._unwound_now = taken

    def write_unwind_rows(self, first: int, rows: bytes) -> None:
        """Place packed rows (eh_frame.ROW) at index first of unwind_rows."""
        self._write_array(self.unwind_rows, first, rows, UNWIND_ROW_SIZE, UNWIND_ROWS_MAX)

    def write_unwind_mappings(self, first: int,
                              mappings: list[tuple[int, int, int, int, int, int]]) -> None:
        """Place (start, end, bias, first_row, rows, table_id) mappings at index first of
        unwind_mappings."""
        packed = b"".join(UNWIND_MAPPING.pack(*m) for m in mappings)
        self._write_array(self.unwind_mappings, first, packed, UNWIND_MAPPING.size,
                          UNWIND_MAPPINGS_MAX)

    def _write_array(self, table: bs.Map, first: int, values: bytes, size: int,
                     capacity: int) -> None:
        count = len(values) // size
        if count == 0:
            return
        if first < 0 or first + count > capacity:
            raise ValueError(f"entries {first}+{count} outside a map of {capacity}")
        keys = struct.pack(f"<{count}I", *range(first, first + count))
        table.update_batch(keys, values, count)

    def set_unwind_process(self, pid: int, first_mapping: int, count: int) -> None:
        """Point pid at its mappings (sorted by start): its samples are walked with tables."""
        self.unwind_processes.update(struct.pack("<I", pid),
                                     UNWIND_PROCESS.pack(first_mapping, count))

    def drop_unwind_process(self, pid: int) -> None:
        self.unwind_processes.delete(struct.pack("<I", pid))

    def read_unwind_stats(self) -> dict[str, int]:
        """Totals since load, summed over CPUs; empty when the unwinder is off."""
        if not self.unwinding:
            return {}
        sums = self.unwind_stats.per_cpu_sums()
        return {name: sums[i] for i, name in enumerate(UNWIND_STAT_NAMES) if name}

    def read_problems(self) -> dict[str, int]:
        """Totals since load, summed over CPUs."""
        sums = self.problems.per_cpu_sums()
        return {name: sums[i] for i, name in enumerate(PROBLEM_NAMES)}

    def set_filter(self, enabled: bool, cgroup_ids: set[int], pids: set[int]) -> None:
        """Make the in-kernel filter match discovery's targets; only differences are written."""
        for table, current, wanted, fmt in (
                (self.filter_cgroups, self.filtered_cgroups, cgroup_ids if enabled else set(),
                 "<Q"),
                (self.filter_pids, self.filtered_pids, pids if enabled else set(), "<I")):
            wanted = {w for w in wanted if 0 <= w < 1 << (8 * struct.calcsize(fmt))}
            for gone in current - wanted:
                table.delete(struct.pack(fmt, gone))
            for new in list(wanted - current)[: FILTER_MAX]:
                table.update(struct.pack(fmt, new), b"\x01")
            current.clear()
            current.update(wanted)
        self.filter_enabled.update(struct.pack("<I", 0), struct.pack("<I", 1 if enabled else 0))

    def close(self) -> None:
        """Close the perf events, programs and maps: the kernel frees everything, nothing is
        pinned or left behind."""
        for fd in self._events:
            try:
                os.close(fd)
            except OSError:
                pass
        self._events.clear()
        self._loaded.close()
