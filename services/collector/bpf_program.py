"""Loads bpf/cpu_sample.c with BCC, attaches it to cpu-clock on every CPU and drains its maps.

Draining reads raw bytes out of the maps with reusable buffers and ``struct`` instead of BCC's
per-entry ctypes objects: the drain runs every second and must cost less than `perf record`.
"""

from __future__ import annotations

import ctypes as ct
import errno
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path

BPF_SOURCE = Path(__file__).resolve().parents[2] / "bpf" / "cpu_sample.c"

log = logging.getLogger("parca_agent.collector.bpf")

COUNTS_MAX = 65536  # distinct (pid, tid, cgroup, stacks) per drain interval before samples are lost
STACKS_MAX = 16384  # distinct stacks per drain; more raise the chance of -EEXIST collisions
FILTER_MAX = 16384  # cgroups and pids to profile
MAX_DEPTH = 127  # the kernel's PERF_MAX_STACK_DEPTH default, what bpf_get_stackid records

# .eh_frame unwinding (bpf/cpu_sample.c): on unless PARCA_AGENT_DWARF_UNWIND is 0/false/off.
UNWIND_ENV = "PARCA_AGENT_DWARF_UNWIND"
UNWIND_ROWS_MAX = 1 << 20  # rows of every loaded table together: 8 MB of kernel memory
UNWIND_PROCESSES_MAX = 4096  # processes with tables at once (8 KB each, allocated on use)
UNWIND_MAPPINGS_MAX = 65536  # mappings of every process with tables together: 2 MB
# Stack ids of unwound user stacks: their unwound_stacks key plus this, apart from the
# stack_traces ids (0 .. STACKS_MAX) in the same place of CountEntry.
UNWOUND_STACK_BASE = 1 << 32

KEY = struct.Struct("<IIQiiQ")  # struct sample_key
VALUE = struct.Struct("<Q")
STACK = struct.Struct(f"<{MAX_DEPTH}Q")
UNWOUND_STACK = struct.Struct(f"<Q{MAX_DEPTH}Q")  # struct unwound_stack: len, addresses
UNWIND_MAPPING = struct.Struct("<QQQII")  # struct unwind_mapping
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
)


def unwind_requested() -> bool:
    return os.environ.get(UNWIND_ENV, "1").strip().lower() not in ("0", "false", "off", "no")


class BpfUnavailable(Exception):
    """BPF cannot run here; the message names the problem and the fix, in one line."""


def check_environment() -> None:
    """Refuse early, with one line, where the program cannot load."""
    if os.geteuid() != 0:
        raise BpfUnavailable("the collector must run as root (or with CAP_BPF and CAP_PERFMON) "
                             "to load BPF programs; start it as root")
    try:
        import bcc  # noqa: F401
    except ImportError:
        raise BpfUnavailable("the bcc Python module is missing: install Debian's python3-bpfcc "
                             "(make run does) and use a venv with system site packages") from None
    build = f"/lib/modules/{os.uname().release}/build"
    if not os.path.exists(build):
        raise BpfUnavailable(f"no kernel headers at {build}: install linux-headers-$(uname -r) "
                             "or run make run, which links Debian's linux-headers-amd64")
    if not os.path.exists("/sys/kernel/btf/vmlinux") and not os.path.isdir("/sys/fs/bpf"):
        raise BpfUnavailable("this kernel shows no BPF support (no /sys/fs/bpf): "
                             "a kernel built with CONFIG_BPF_SYSCALL is needed")


@dataclass
class CountEntry:
    pid: int
    tid: int
    cgroup_id: int
    user_stack_id: int
    kernel_stack_id: int
    count: int


class CpuSampler:
    """The loaded program: perf events attached, maps open."""

    def __init__(self, frequency: int, unwind: bool | None = None):
        check_environment()
        import bcc

        self._bcc = bcc
        self.unwinding = unwind_requested() if unwind is None else unwind
        while True:
            try:
                self.bpf = self._load(bcc, self.unwinding)
                break
            except Exception as e:
                first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
                if not self.unwinding:
                    raise BpfUnavailable(f"BCC could not compile or load {BPF_SOURCE.name}: "
                                         f"{first_line} (check the kernel headers link and "
                                         "dmesg)") from None
                # The walker needs tail calls, BTF task helpers and a verifier that takes it:
                # frame pointers still work without it.
                log.warning("the .eh_frame unwinder did not load (%s); frame pointers only",
                            first_line)
                self.unwinding = False
        try:
            self.bpf.attach_perf_event(ev_type=bcc.PerfType.SOFTWARE,
                                       ev_config=bcc.PerfSWConfig.CPU_CLOCK,
                                       fn_name=b"on_cpu_sample", sample_freq=frequency)
        except Exception as e:
            self.bpf.cleanup()
            raise BpfUnavailable(f"cannot open cpu-clock perf events: {e} "
                                 "(is perf_event_paranoid or a seccomp profile in the way?)") from None
        self.counts = self.bpf["counts"]
        self.stacks = self.bpf["stack_traces"]
        self.problems = self.bpf["problems"]
        self.filter_cgroups = self.bpf["filter_cgroups"]
        self.filter_pids = self.bpf["filter_pids"]
        self.filter_enabled = self.bpf["filter_enabled"]
        if self.unwinding:
            self.unwind_rows = self.bpf["unwind_rows"]
            self.unwind_processes = self.bpf["unwind_processes"]
            self.unwind_mappings = self.bpf["unwind_mappings"]
            self.unwound_stacks = self.bpf["unwound_stacks"]
            self.unwind_stats = self.bpf["unwind_stats"]
            self._unwound_buf = ct.create_string_buffer(UNWOUND_STACK.size)
        self._lib = bcc.libbcc.lib
        # Reused buffers: allocating 65536 keys every second would dominate the drain.
        self._keys = ct.create_string_buffer(KEY.size * COUNTS_MAX)
        self._values = ct.create_string_buffer(VALUE.size * COUNTS_MAX)
        self._stack_buf = ct.create_string_buffer(STACK.size)
        self._batch_ok = True
        self.filtered_cgroups: set[int] = set()
        self.filtered_pids: set[int] = set()

    @staticmethod
    def _load(bcc, unwind: bool):
        cflags = [f"-DCOUNTS_MAX={COUNTS_MAX}", f"-DSTACKS_MAX={STACKS_MAX}",
                  f"-DFILTER_MAX={FILTER_MAX}", f"-DDWARF_UNWIND={int(unwind)}"]
        if unwind:
            cflags += [f"-DUNWIND_ROWS_MAX={UNWIND_ROWS_MAX}",
                       f"-DUNWIND_MAPPINGS_MAX={UNWIND_MAPPINGS_MAX}",
                       f"-DUNWIND_PROCESSES_MAX={UNWIND_PROCESSES_MAX}"]
        bpf = bcc.BPF(src_file=str(BPF_SOURCE).encode(), cflags=cflags)
        try:
            if unwind:
                walker = bpf.load_func(b"unwind_user_stack", bcc.BPF.PERF_EVENT)
                bpf["unwind_programs"][ct.c_int(0)] = ct.c_int(walker.fd)
            # Loaded here, not in attach_perf_event, so that a verifier refusal is told apart
            # from perf events that cannot open.
            bpf.load_func(b"on_cpu_sample", bcc.BPF.PERF_EVENT)
        except Exception:
            bpf.cleanup()
            raise
        return bpf

    def drain_counts(self) -> list[CountEntry]:
        """Take every count out of the kernel map (lookup-and-delete)."""
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
        fn = self._lib.bpf_lookup_and_delete_batch
        out_batch = ct.c_uint32(0)
        count = ct.c_uint32(0)
        total = 0
        first = True
        while total < COUNTS_MAX:
            count.value = COUNTS_MAX - total
            res = fn(self.counts.map_fd, None if first else ct.byref(out_batch),
                     ct.byref(out_batch), ct.byref(self._keys, KEY.size * total),
                     ct.byref(self._values, VALUE.size * total), ct.byref(count))
            err = ct.get_errno()
            total += count.value
            first = False
            if res != 0:
                if err == errno.ENOENT:
                    break  # the whole map was read
                raise OSError(err, f"BPF_MAP_LOOKUP_AND_DELETE_BATCH: {os.strerror(err)}")
            if count.value == 0:
                break
        keys = self._keys.raw[: KEY.size * total]
        values = self._values.raw[: VALUE.size * total]
        return [_entry(*k, v[0]) for k, v in zip(KEY.iter_unpack(keys),
                                                  VALUE.iter_unpack(values))]

    def _drain_iterate(self) -> list[CountEntry]:
        entries = []
        for k in list(self.counts.keys()):
            try:
                v = self.counts[k].value
                del self.counts[k]
            except KeyError:
                continue
            entries.append(_entry(k.pid, k.tid, k.cgroup_id, k.user_stack_id,
                                  k.kernel_stack_id, k.user_stack_hash, v))
        return entries

    def take_stack(self, stack_id: int) -> list[int] | None:
        """The addresses of one stack, innermost first; the stack is deleted from the map
        (BCC's StackTrace.clear() does nothing, so without this the map fills up)."""
        if stack_id >= UNWOUND_STACK_BASE:
            return self._take_unwound(stack_id - UNWOUND_STACK_BASE)
        key = ct.c_int(stack_id)
        res = self._lib.bpf_lookup_elem(self.stacks.map_fd, ct.byref(key), self._stack_buf)
        self._lib.bpf_delete_elem(self.stacks.map_fd, ct.byref(key))
        if res != 0:
            return None
        addresses = STACK.unpack(self._stack_buf.raw)
        n = addresses.index(0) if 0 in addresses else MAX_DEPTH
        return list(addresses[:n])

    def _take_unwound(self, stack_hash: int) -> list[int] | None:
        if not self.unwinding:
            return None
        key = ct.c_uint64(stack_hash)
        res = self._lib.bpf_lookup_elem(self.unwound_stacks.map_fd, ct.byref(key),
                                        self._unwound_buf)
        self._lib.bpf_delete_elem(self.unwound_stacks.map_fd, ct.byref(key))
        if res != 0:
            return None
        n, *addresses = UNWOUND_STACK.unpack(self._unwound_buf.raw)
        return list(addresses[: min(n, MAX_DEPTH)])

    def write_unwind_rows(self, first: int, rows: bytes) -> None:
        """Place packed rows (eh_frame.ROW) at index first of unwind_rows."""
        self._write_array(self.unwind_rows, first, rows, UNWIND_ROW_SIZE, UNWIND_ROWS_MAX)

    def write_unwind_mappings(self, first: int,
                              mappings: list[tuple[int, int, int, int, int]]) -> None:
        """Place (start, end, bias, first_row, rows) mappings at index first of unwind_mappings."""
        packed = b"".join(UNWIND_MAPPING.pack(*m) for m in mappings)
        self._write_array(self.unwind_mappings, first, packed, UNWIND_MAPPING.size,
                          UNWIND_MAPPINGS_MAX)

    def _write_array(self, table, first: int, values: bytes, size: int, capacity: int) -> None:
        count = len(values) // size
        if count == 0:
            return
        if first < 0 or first + count > capacity:
            raise ValueError(f"entries {first}+{count} outside a map of {capacity}")
        keys = (ct.c_uint32 * count)(*range(first, first + count))
        buffer = ct.create_string_buffer(values, len(values))
        n = ct.c_uint32(count)
        if self._lib.bpf_update_batch(table.map_fd, keys, buffer, ct.byref(n)) != 0:
            err = ct.get_errno()
            raise OSError(err, f"BPF_MAP_UPDATE_BATCH: {os.strerror(err)}")

    def set_unwind_process(self, pid: int, first_mapping: int, count: int) -> None:
        """Point pid at its mappings (sorted by start): its samples are walked with tables."""
        key = ct.c_uint32(pid)
        value = ct.create_string_buffer(UNWIND_PROCESS.pack(first_mapping, count))
        if self._lib.bpf_update_elem(self.unwind_processes.map_fd, ct.byref(key), value, 0) != 0:
            err = ct.get_errno()
            raise OSError(err, f"unwind_processes[{pid}]: {os.strerror(err)}")

    def drop_unwind_process(self, pid: int) -> None:
        key = ct.c_uint32(pid)
        self._lib.bpf_delete_elem(self.unwind_processes.map_fd, ct.byref(key))

    def read_unwind_stats(self) -> dict[str, int]:
        """Totals since load, summed over CPUs; empty when the unwinder is off."""
        if not self.unwinding:
            return {}
        return {name: int(sum(self.unwind_stats[ct.c_int(i)]))
                for i, name in enumerate(UNWIND_STAT_NAMES) if name}

    def read_problems(self) -> dict[str, int]:
        """Totals since load, summed over CPUs."""
        totals = {}
        for i, name in enumerate(PROBLEM_NAMES):
            per_cpu = self.problems[ct.c_int(i)]
            totals[name] = int(sum(per_cpu))
        return totals

    def set_filter(self, enabled: bool, cgroup_ids: set[int], pids: set[int]) -> None:
        """Make the in-kernel filter match discovery's targets; only differences are written."""
        one = ct.c_uint8(1)
        for table, current, wanted, ctype in (
                (self.filter_cgroups, self.filtered_cgroups, cgroup_ids if enabled else set(),
                 ct.c_uint64),
                (self.filter_pids, self.filtered_pids, pids if enabled else set(), ct.c_uint32)):
            for gone in current - wanted:
                try:
                    del table[ctype(gone)]
                except KeyError:
                    pass
            for new in list(wanted - current)[: FILTER_MAX]:
                table[ctype(new)] = one
            current.clear()
            current.update(wanted)
        self.filter_enabled[ct.c_int(0)] = ct.c_uint32(1 if enabled else 0)

    def close(self) -> None:
        """Detach perf events and unload the program: nothing is left in the kernel."""
        self.bpf.cleanup()


def _entry(pid: int, tid: int, cgroup_id: int, user_stack_id: int, kernel_stack_id: int,
           user_stack_hash: int, count: int) -> CountEntry:
    if user_stack_hash:
        user_stack_id = UNWOUND_STACK_BASE + user_stack_hash
    return CountEntry(pid, tid, cgroup_id, user_stack_id, kernel_stack_id, count)
