"""Loads bpf/cpu_sample.c with BCC, attaches it to cpu-clock on every CPU and drains its maps.

Draining reads raw bytes out of the maps with reusable buffers and ``struct`` instead of BCC's
per-entry ctypes objects: the drain runs every second and must cost less than `perf record`.
"""

from __future__ import annotations

import ctypes as ct
import errno
import os
import struct
from dataclasses import dataclass
from pathlib import Path

BPF_SOURCE = Path(__file__).resolve().parents[2] / "bpf" / "cpu_sample.c"

COUNTS_MAX = 65536  # distinct (pid, tid, cgroup, stacks) per drain interval before samples are lost
STACKS_MAX = 16384  # distinct stacks per drain; more raise the chance of -EEXIST collisions
FILTER_MAX = 16384  # cgroups and pids to profile
MAX_DEPTH = 127  # the kernel's PERF_MAX_STACK_DEPTH default, what bpf_get_stackid records

KEY = struct.Struct("<IIQii")  # struct sample_key
VALUE = struct.Struct("<Q")
STACK = struct.Struct(f"<{MAX_DEPTH}Q")

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

    def __init__(self, frequency: int):
        check_environment()
        import bcc

        self._bcc = bcc
        cflags = [f"-DCOUNTS_MAX={COUNTS_MAX}", f"-DSTACKS_MAX={STACKS_MAX}",
                  f"-DFILTER_MAX={FILTER_MAX}"]
        try:
            self.bpf = bcc.BPF(src_file=str(BPF_SOURCE).encode(), cflags=cflags)
        except Exception as e:
            raise BpfUnavailable(f"BCC could not compile or load {BPF_SOURCE.name}: "
                                 f"{str(e).splitlines()[0] if str(e) else type(e).__name__}"
                                 " (check the kernel headers link and dmesg)") from None
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
        self._lib = bcc.libbcc.lib
        # Reused buffers: allocating 65536 keys every second would dominate the drain.
        self._keys = ct.create_string_buffer(KEY.size * COUNTS_MAX)
        self._values = ct.create_string_buffer(VALUE.size * COUNTS_MAX)
        self._stack_buf = ct.create_string_buffer(STACK.size)
        self._batch_ok = True
        self.filtered_cgroups: set[int] = set()
        self.filtered_pids: set[int] = set()

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
        return [CountEntry(*k, v[0]) for k, v in zip(KEY.iter_unpack(keys),
                                                      VALUE.iter_unpack(values))]

    def _drain_iterate(self) -> list[CountEntry]:
        entries = []
        for k in list(self.counts.keys()):
            try:
                v = self.counts[k].value
                del self.counts[k]
            except KeyError:
                continue
            entries.append(CountEntry(k.pid, k.tid, k.cgroup_id, k.user_stack_id,
                                      k.kernel_stack_id, v))
        return entries

    def take_stack(self, stack_id: int) -> list[int] | None:
        """The addresses of one stack, innermost first; the stack is deleted from the map
        (BCC's StackTrace.clear() does nothing, so without this the map fills up)."""
        key = ct.c_int(stack_id)
        res = self._lib.bpf_lookup_elem(self.stacks.map_fd, ct.byref(key), self._stack_buf)
        self._lib.bpf_delete_elem(self.stacks.map_fd, ct.byref(key))
        if res != 0:
            return None
        addresses = STACK.unpack(self._stack_buf.raw)
        n = addresses.index(0) if 0 in addresses else MAX_DEPTH
        return list(addresses[:n])

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
