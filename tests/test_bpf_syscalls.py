"""The collector's own bpf() calls against the real kernel (no BCC in the process)."""

from __future__ import annotations

import ctypes
import struct

import pytest

from services.collector import bpf_syscalls as bs

pytestmark = pytest.mark.bpf


def test_hash_map_round_trip_and_batch_drain(require_bpf):
    m = bs.Map.create_hash(key_size=8, value_size=8, max_entries=4096)
    try:
        for i in range(3000):
            m.update(struct.pack("<Q", i), struct.pack("<Q", i * 7))
        assert m.lookup(struct.pack("<Q", 10)) == struct.pack("<Q", 70)
        assert m.lookup(struct.pack("<Q", 99999)) is None
        assert m.delete(struct.pack("<Q", 10)) and not m.delete(struct.pack("<Q", 10))
        assert len(m.keys()) == 2999
        keys = ctypes.create_string_buffer(8 * m.max_entries)
        values = ctypes.create_string_buffer(8 * m.max_entries)
        n = m.lookup_and_delete_batch(keys, values)
        assert n == 2999
        pairs = dict(zip((k for (k,) in struct.iter_unpack("<Q", keys.raw[:8 * n])),
                         (v for (v,) in struct.iter_unpack("<Q", values.raw[:8 * n]))))
        assert all(pairs[k] == k * 7 for k in pairs) and 10 not in pairs
        assert m.keys() == []  # drained
        assert m.lookup_and_delete_batch(keys, values) == 0
    finally:
        m.close()


def test_take_into_returns_the_value_once_and_batches_drain_in_chunks(require_bpf):
    m = bs.Map.create_hash(key_size=8, value_size=16, max_entries=1024)
    try:
        for i in range(700):
            m.update(struct.pack("<Q", i), struct.pack("<QQ", i, i + 1))
        out = ctypes.create_string_buffer(16)
        assert m.take_into(struct.pack("<Q", 5), out) and out.raw == struct.pack("<QQ", 5, 6)
        assert not m.take_into(struct.pack("<Q", 5), out)  # gone with the first call
        # A caller with room for 256 entries at a time gets them all in a few calls (whole
        # buckets move at once, so a call may return fewer) and then 0.
        keys = ctypes.create_string_buffer(8 * 256)
        values = ctypes.create_string_buffer(16 * 256)
        got, calls = {}, 0
        while True:
            n = m.lookup_and_delete_batch(keys, values, 256)
            calls += 1
            for j in range(n):
                got[struct.unpack_from("<Q", keys, 8 * j)[0]] = \
                    struct.unpack_from("<QQ", values, 16 * j)
            assert n <= 256
            if n == 0:
                break
        assert 4 <= calls <= 8 and len(got) == 699 and 5 not in got
        assert all(v == (k, k + 1) for k, v in got.items())
        assert m.keys() == []
    finally:
        m.close()


def test_per_cpu_sums_read_a_whole_per_cpu_array_at_once(require_bpf):
    cpus = bs.possible_cpus()
    attr = bytearray(72)
    struct.pack_into("<IIIII", attr, 0, 6, 4, 8, 5, 0)  # BPF_MAP_TYPE_PERCPU_ARRAY, 5 x u64
    m = bs.Map(bs.bpf(bs.BPF_MAP_CREATE, attr), 4, 8, 5, per_cpu=True)
    try:
        for index in range(5):
            per_cpu = b"".join(struct.pack("<Q", index * 100 + cpu) for cpu in range(cpus))
            m.update(struct.pack("<I", index), per_cpu)
        expected = [sum(i * 100 + c for c in range(cpus)) for i in range(5)]
        assert m.per_cpu_sums() == expected
        assert [sum(m.per_cpu_values(struct.pack("<I", i))) for i in range(5)] == expected
    finally:
        m.close()


def test_cpu_clock_events_open_on_every_online_cpu(require_bpf):
    import os

    fds = [bs.open_cpu_clock(cpu, 100) for cpu in bs.online_cpus()]
    try:
        assert len(fds) == os.cpu_count()
    finally:
        for fd in fds:
            os.close(fd)


def test_a_ring_buffer_wakes_a_poller_and_clear_passes_its_records(require_bpf):
    """The collector sleeps on new_pid_events: its fd polls readable once the program has
    written a record, and not after clear() has passed them (without reading them)."""
    import os
    import select
    import time

    from services.collector.loader import load

    source = r"""
    #include <uapi/linux/bpf_perf_event.h>
    BPF_ARRAY(armed, u32, 1);
    BPF_RINGBUF_OUTPUT(events, 1);
    int on_tick(struct bpf_perf_event_data *ctx) {
        u32 zero = 0;
        u32 *on = armed.lookup(&zero);
        if (on && *on)
            events.ringbuf_output(&zero, sizeof(zero), 0);
        return 0;
    }
    """
    loaded = load(source, [], ["on_tick"], ["armed", "events"])
    signal = loaded.rings["events"]
    events = []

    def readable(timeout: float) -> bool:
        return bool(select.select([signal.fileno()], [], [], timeout)[0])

    def arm(on: int) -> None:
        loaded.maps["armed"].update(struct.pack("<I", 0), struct.pack("<I", on))

    try:
        for cpu in bs.online_cpus():
            fd = bs.open_cpu_clock(cpu, 100)
            events.append(fd)
            bs.attach_and_enable(fd, loaded.programs["on_tick"])
        assert not readable(0.3) and not signal.clear()
        arm(1)
        assert readable(5.0), "no wake-up after the program wrote records"
        arm(0)
        time.sleep(0.1)  # a program run that read armed=1 just before has finished
        assert signal.clear()
        assert not readable(0.3), "still readable after clear()"
        arm(1)
        assert readable(5.0), "no wake-up for records written after clear()"
    finally:
        for fd in events:
            os.close(fd)
        loaded.close()


def test_a_child_loads_the_program_and_this_process_attaches_it(require_bpf):
    """The loader's child compiles with BCC; this process (which never imports bcc) gets the
    descriptors, attaches the program to cpu-clock events and reads what it counted."""
    import os
    import subprocess
    import sys
    import time

    from services.collector.loader import load

    source = r"""
    #include <uapi/linux/bpf_perf_event.h>
    BPF_PERCPU_ARRAY(ticks, u64, 1);
    BPF_HASH(by_pid, u32, u64, 1024);
    int on_tick(struct bpf_perf_event_data *ctx) {
        u32 zero = 0;
        u64 *n = ticks.lookup(&zero);
        if (n) (*n)++;
        u32 pid = bpf_get_current_pid_tgid() >> 32;
        u64 one = 1, *c = by_pid.lookup(&pid);
        if (c) (*c)++; else by_pid.update(&pid, &one);
        return 0;
    }
    """
    loaded = load(source, [], ["on_tick"], ["ticks", "by_pid"])
    assert "bcc" not in sys.modules
    events = []
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        for cpu in bs.online_cpus():
            fd = bs.open_cpu_clock(cpu, 100)
            events.append(fd)
            bs.attach_and_enable(fd, loaded.programs["on_tick"])
        time.sleep(1.5)
        per_cpu = loaded.maps["ticks"].lookup(struct.pack("<I", 0))
        total = sum(v for (v,) in struct.iter_unpack("<Q", per_cpu))
        assert total > 50
        busy_count = loaded.maps["by_pid"].lookup(struct.pack("<I", busy.pid))
        assert busy_count is not None and struct.unpack("<Q", busy_count)[0] > 50
    finally:
        busy.kill()
        busy.wait()
        for fd in events:
            os.close(fd)
        loaded.close()
