"""The few kernel calls the long-running collector needs, without BCC or LLVM in its process.

BCC compiles with an embedded LLVM: importing it and compiling costs the process ~170 MB that
it never gives back. So a short-lived loader process compiles and loads the program and hands
over the program and map file descriptors (SCM_RIGHTS); the collector then opens the perf
events, attaches the program and reads and writes the maps with these calls alone.

Layouts follow include/uapi/linux/bpf.h and perf_event.h (stable kernel ABI).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import platform
import struct

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.ioctl.restype = ctypes.c_int

# System call numbers differ by architecture.
_SYSCALLS = {"x86_64": {"bpf": 321, "perf_event_open": 298},
             "aarch64": {"bpf": 280, "perf_event_open": 241}}
_NR = _SYSCALLS.get(platform.machine(), _SYSCALLS["x86_64"])

# enum bpf_cmd
BPF_MAP_CREATE = 0
BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_MAP_LOOKUP_AND_DELETE_ELEM = 21
BPF_MAP_LOOKUP_BATCH = 24
BPF_MAP_LOOKUP_AND_DELETE_BATCH = 25
BPF_MAP_UPDATE_BATCH = 26

BPF_MAP_TYPE_HASH = 1
BPF_ANY = 0

PERF_TYPE_SOFTWARE = 1
PERF_COUNT_SW_CPU_CLOCK = 0
PERF_FLAG_FD_CLOEXEC = 1 << 3
PERF_EVENT_IOC_ENABLE = 0x2400
PERF_EVENT_IOC_DISABLE = 0x2401
PERF_EVENT_IOC_SET_BPF = 0x40042408
_ATTR_FREQ = 1 << 10  # perf_event_attr bit field: sample_freq instead of sample_period
_ATTR_DISABLED = 1 << 0
PERF_ATTR_SIZE = 128  # PERF_ATTR_SIZE_VER7; the kernel accepts any size it knows


# What a kernel answers for a command it does not have for a map type.
_UNSUPPORTED = {22, 95, 524}  # EINVAL, EOPNOTSUPP, ENOTSUPP (kernel-internal, leaks out)


class BpfError(OSError):
    pass


def _call(number: int, *args) -> int:
    res = _libc.syscall(ctypes.c_long(number), *args)
    if res < 0:
        err = ctypes.get_errno()
        raise BpfError(err, os.strerror(err))
    return res


def bpf(cmd: int, attr: bytearray) -> int:
    buf = (ctypes.c_char * len(attr)).from_buffer(attr)
    return _call(_NR["bpf"], ctypes.c_int(cmd), buf, ctypes.c_uint(len(attr)))


def _ptr(buf) -> int:
    return ctypes.addressof(buf) if buf is not None else 0


def possible_cpus() -> int:
    """Per-CPU maps hold one value slot for every possible CPU, not only the online ones."""
    with open("/sys/devices/system/cpu/possible") as fh:
        text = fh.read().strip()
    count = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        count += int(hi or lo) - int(lo) + 1
    return count


def online_cpus() -> list[int]:
    with open("/sys/devices/system/cpu/online") as fh:
        text = fh.read().strip()
    cpus = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        cpus.extend(range(int(lo), int(hi or lo) + 1))
    return cpus


class RingSignal:
    """A BPF ring buffer used as a wake-up only. Its fd polls readable while it holds records
    the consumer has not passed; clear() passes them all without reading them, by moving the
    consumer position (the first page of the map, the only one user space may write) to the
    producer position (the second page). The records' contents are never needed: the program
    writes one when there is something to fetch elsewhere."""

    def __init__(self, fd: int, name: str = ""):
        self.fd = fd
        self.name = name
        page = mmap.PAGESIZE
        self._consumer = mmap.mmap(fd, page, mmap.MAP_SHARED,
                                   mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        try:
            self._producer = mmap.mmap(fd, page, mmap.MAP_SHARED, mmap.PROT_READ, offset=page)
        except OSError:
            self._consumer.close()
            raise

    def fileno(self) -> int:
        return self.fd

    def clear(self) -> bool:
        """Mark every record read; whether there was any."""
        produced = struct.unpack_from("<Q", self._producer, 0)[0]
        if struct.unpack_from("<Q", self._consumer, 0)[0] == produced:
            return False
        struct.pack_into("<Q", self._consumer, 0, produced)
        return True

    def close(self) -> None:
        self._consumer.close()
        self._producer.close()
        os.close(self.fd)


class Map:
    """A BPF map by file descriptor; keys and values are bytes of the map's sizes."""

    def __init__(self, fd: int, key_size: int, value_size: int, max_entries: int,
                 per_cpu: bool = False, name: str = ""):
        self.fd = fd
        self.key_size = key_size
        self.max_entries = max_entries
        self.per_cpu = per_cpu
        self.name = name
        # A per-CPU map's value, as the kernel copies it out: one 8-byte-aligned slot per CPU.
        self.slot_size = (value_size + 7) & ~7
        self.value_size = self.slot_size * possible_cpus() if per_cpu else value_size
        self._key = ctypes.create_string_buffer(key_size)
        self._next = ctypes.create_string_buffer(key_size)
        self._value = ctypes.create_string_buffer(self.value_size)
        self._take_ok = True  # lookup-and-delete of one element; stack maps have it since 6.x
        # Reused by every batch call (several a drain): no allocation per call. So one map's
        # batch calls must come from one thread (the drain's; the loader only updates tables).
        self._batch_attr = bytearray(56)
        self._out_batch = ctypes.create_string_buffer(8)
        self._sum_bufs = None

    @classmethod
    def create_hash(cls, key_size: int, value_size: int, max_entries: int) -> "Map":
        """A new hash map (tests use it to exercise these calls on the real kernel)."""
        attr = bytearray(72)
        struct.pack_into("<IIIII", attr, 0, BPF_MAP_TYPE_HASH, key_size, value_size,
                         max_entries, 0)
        return cls(bpf(BPF_MAP_CREATE, attr), key_size, value_size, max_entries)

    def _elem_attr(self, key, value, flags: int = 0) -> bytearray:
        attr = bytearray(32)
        struct.pack_into("<IIQQQ", attr, 0, self.fd, 0, _ptr(key), _ptr(value), flags)
        return attr

    def _found(self, cmd: int, attr: bytearray) -> bool:
        """Run an element command; False where the key is absent (ENOENT)."""
        try:
            bpf(cmd, attr)
        except BpfError as e:
            if e.errno == 2:
                return False
            raise
        return True

    def lookup(self, key: bytes) -> bytes | None:
        return self._value.raw if self.lookup_into(key, self._value) else None

    def lookup_into(self, key: bytes, out) -> bool:
        """Look up into a caller's buffer (the drain reuses one); False when absent."""
        self._key.raw = key
        return self._found(BPF_MAP_LOOKUP_ELEM, self._elem_attr(self._key, out))

    def update(self, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
        self._key.raw = key
        value_buf = ctypes.create_string_buffer(value, len(value))
        bpf(BPF_MAP_UPDATE_ELEM, self._elem_attr(self._key, value_buf, flags))

    def take_into(self, key: bytes, out) -> bool:
        """Look up and delete one element in one call where the kernel can (hash maps since
        5.14, stack trace maps later), else in two; False when it was absent."""
        self._key.raw = key
        if self._take_ok:
            try:
                return self._found(BPF_MAP_LOOKUP_AND_DELETE_ELEM,
                                   self._elem_attr(self._key, out))
            except BpfError as e:
                if e.errno not in _UNSUPPORTED:
                    raise
                self._take_ok = False
        found = self._found(BPF_MAP_LOOKUP_ELEM, self._elem_attr(self._key, out))
        self._found(BPF_MAP_DELETE_ELEM, self._elem_attr(self._key, None))
        return found

    def delete(self, key: bytes) -> bool:
        self._key.raw = key
        return self._found(BPF_MAP_DELETE_ELEM, self._elem_attr(self._key, None))

    def keys(self) -> list[bytes]:
        out = []
        attr = bytearray(32)
        current = None
        while True:
            struct.pack_into("<IIQQQ", attr, 0, self.fd, 0, _ptr(current), _ptr(self._next), 0)
            if not self._found(BPF_MAP_GET_NEXT_KEY, attr):
                return out  # past the last key
            out.append(self._next.raw)
            current = ctypes.create_string_buffer(self._next.raw, self.key_size)
            if len(out) > self.max_entries:
                return out  # entries churn under us: never loop forever

    def lookup_and_delete_batch(self, keys_buf, values_buf, capacity: int | None = None) -> int:
        """Move entries into the caller's buffers, up to ``capacity`` of them (default: the
        map's size, i.e. all); return how many. The kernel moves whole hash buckets, so a call
        may stop short of ``capacity`` with entries left: a caller with smaller buffers calls
        again until it gets 0."""
        return self.take_batch(keys_buf, values_buf, capacity)[0]

    def take_batch(self, keys_buf, values_buf, capacity: int | None = None) -> tuple[int, bool]:
        """lookup_and_delete_batch, and whether the kernel walked to the end of the map: a
        caller draining in chunks stops there rather than walking every bucket once more only
        to be told the map is empty."""
        return self._batch(BPF_MAP_LOOKUP_AND_DELETE_BATCH, keys_buf, values_buf,
                           self.max_entries if capacity is None else capacity)

    def lookup_batch(self, keys_buf, values_buf) -> int:
        """Copy every entry (an array's: all of them) into buffers sized max_entries."""
        return self._batch(BPF_MAP_LOOKUP_BATCH, keys_buf, values_buf, self.max_entries)[0]

    def _batch(self, cmd: int, keys_buf, values_buf, capacity: int) -> tuple[int, bool]:
        """(entries moved, end of the map reached)."""
        attr, out_batch = self._batch_attr, self._out_batch
        total, first, ended = 0, True, False
        while total < capacity:
            struct.pack_into("<QQQQIIQQ", attr, 0, 0 if first else _ptr(out_batch),
                             _ptr(out_batch), _ptr(keys_buf) + total * self.key_size,
                             _ptr(values_buf) + total * self.value_size,
                             capacity - total, self.fd, 0, 0)
            first = False
            try:
                bpf(cmd, attr)
                err = 0
            except BpfError as e:
                err = e.errno
            count = struct.unpack_from("<I", attr, 32)[0]
            total += count
            if err == 2:  # ENOENT: the end of the map
                ended = True
                break
            if err == 28 and total:  # ENOSPC: the next bucket does not fit what is left
                break
            if err:
                raise BpfError(err, f"batch command {cmd}: {os.strerror(err)}")
            if count == 0:
                break
        return total, ended

    def update_batch(self, keys: bytes, values: bytes, count: int) -> None:
        """Write ``count`` entries at once (keys and values packed back to back)."""
        keys_buf = ctypes.create_string_buffer(keys, len(keys))
        values_buf = ctypes.create_string_buffer(values, len(values))
        attr = bytearray(56)
        struct.pack_into("<QQQQIIQQ", attr, 0, 0, 0, _ptr(keys_buf), _ptr(values_buf), count,
                         self.fd, 0, 0)
        bpf(BPF_MAP_UPDATE_BATCH, attr)
        done = struct.unpack_from("<I", attr, 32)[0]
        if done != count:
            raise BpfError(0, f"update batch wrote {done} of {count} entries")

    def per_cpu_sums(self, fmt: str = "<Q") -> list[int]:
        """A per-CPU array's values, each summed over CPUs, by index: one call for the whole
        array where the kernel has batch lookups (5.6), one per element otherwise."""
        if self._sum_bufs is None:  # read every drain: allocated once
            self._sum_bufs = (ctypes.create_string_buffer(self.key_size * self.max_entries),
                              ctypes.create_string_buffer(self.value_size * self.max_entries))
        keys, values = self._sum_bufs
        sums = [0] * self.max_entries
        try:
            n = self.lookup_batch(keys, values)
        except BpfError as e:
            if e.errno not in _UNSUPPORTED:
                raise
            return [sum(self.per_cpu_values(struct.pack("<I", i), fmt))
                    for i in range(self.max_entries)]
        cpus = self.value_size // self.slot_size
        # One unpack per element: its value on every CPU (slots padded to 8 bytes).
        order, item = (fmt[0], fmt[1:]) if fmt[0] in "@=<>!" else ("", fmt)
        pad = "x" * (self.slot_size - struct.calcsize(fmt))
        slot = struct.Struct(order + (item + pad) * cpus)
        raw = ctypes.string_at(values, self.value_size * n)
        for j in range(n):
            index = struct.unpack_from("<I", keys, j * self.key_size)[0]
            sums[index] = sum(slot.unpack_from(raw, j * self.value_size))
        return sums

    def per_cpu_values(self, key: bytes, fmt: str = "<Q") -> list[int]:
        """A per-CPU map's value for every possible CPU."""
        raw = self.lookup(key)
        if raw is None:
            return []
        item = struct.Struct(fmt)
        return [item.unpack_from(raw, i * self.slot_size)[0]
                for i in range(len(raw) // self.slot_size)]

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def open_cpu_clock(cpu: int, frequency: int) -> int:
    """A disabled software cpu-clock sampling event on one CPU, for every process."""
    attr = bytearray(PERF_ATTR_SIZE)
    struct.pack_into("<IIQQ", attr, 0, PERF_TYPE_SOFTWARE, PERF_ATTR_SIZE,
                     PERF_COUNT_SW_CPU_CLOCK, frequency)
    struct.pack_into("<Q", attr, 40, _ATTR_FREQ | _ATTR_DISABLED)  # the flags bit field
    buf = (ctypes.c_char * len(attr)).from_buffer(attr)
    return _call(_NR["perf_event_open"], buf, ctypes.c_int(-1), ctypes.c_int(cpu),
                 ctypes.c_int(-1), ctypes.c_ulong(PERF_FLAG_FD_CLOEXEC))


def attach_and_enable(event_fd: int, prog_fd: int) -> None:
    for request, arg in ((PERF_EVENT_IOC_SET_BPF, prog_fd), (PERF_EVENT_IOC_ENABLE, 0)):
        if _libc.ioctl(ctypes.c_int(event_fd), ctypes.c_ulong(request), ctypes.c_int(arg)) < 0:
            err = ctypes.get_errno()
            raise BpfError(err, f"perf event ioctl {request:#x}: {os.strerror(err)}")
