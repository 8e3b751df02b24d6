"""The collector on the real kernel: BPF sampling of a known workload, over the real stream."""

from __future__ import annotations

import os
import subprocess
import time

import pytest
import zmq

from services import wire
from services.collector import proc, processes
from services.collector.bpf_program import COUNTS_MAX, COUNTS_MIN, counts_capacity
from services.collector.build_id import BuildIdCache
from services.collector.kernel_symbols import KernelSymbols
from services.collector.processes import ProcessTable
from services.collector.service import drain_interval
from tests.conftest import check_bpf
from tests.helpers.services import (
    PYTHON,
    ROOT,
    Subscriber,
    service_env,
    start_service,
    stop,
    wait_until,
)
from tests.helpers.workload import build_chain_workload

pytestmark = pytest.mark.bpf

# The collector's drain interval on this host (its default 10 s window, 100 Hz): 5 s on 2 CPUs.
DRAIN = drain_interval(10, os.cpu_count() or 1, 100)


@pytest.fixture(scope="module")
def collector(tmp_path_factory):
    check_bpf()
    run_dir = str(tmp_path_factory.mktemp("run"))
    cache_dir = str(tmp_path_factory.mktemp("cache"))
    log = os.path.join(run_dir, "collector.log")
    p = start_service("collector", service_env(run_dir, cache_dir), log)
    sock = os.path.join(run_dir, wire.ENDPOINT_COLLECTOR)
    assert wait_until(lambda: os.path.exists(sock) or p.poll() is not None, 60)
    assert p.poll() is None, open(log).read()
    yield run_dir, p, log
    assert stop(p) == 0, open(log).read()
    assert not os.path.exists(sock), "the collector left its socket file behind"


def test_workload_samples_arrive_with_its_pid_count_and_mappings(collector, tmp_path):
    """Every sample of a process's whole life, against the CPU time the kernel charged it.

    Counting over the process's whole life (it exits by itself, and the stream is read until
    its samples stop) makes the check independent of how fast a loaded machine delivers the
    batches."""
    run_dir, _, _ = collector
    binary = build_chain_workload(tmp_path)
    sub = Subscriber(run_dir, wire.ENDPOINT_COLLECTOR, [wire.TOPIC_SAMPLES, wire.TOPIC_PROCESS])
    # 6 s of wall time: even sharing a loaded machine's cores it gets the 2 CPU-s the count
    # check needs to be meaningful.
    workload = subprocess.Popen([str(binary), "6", "100"])
    counted, meta, addresses, batches = 0, None, set(), 0
    cpu_seconds, last_sample = None, time.monotonic()
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline:
            if cpu_seconds is None:
                pid, status, usage = os.wait4(workload.pid, os.WNOHANG)
                if pid:
                    cpu_seconds = usage.ru_utime + usage.ru_stime
                    workload.returncode = status
            elif time.monotonic() - last_sample > DRAIN + 2:
                break  # exited, and a drain without any of its samples
            for msg in sub.messages(0.2):
                if msg.type == "process" and msg.body["pid"] == workload.pid:
                    meta = msg.body
                elif msg.type == "samples":
                    batches += 1
                    stacks = msg.body["stacks"]
                    for pid, tid, cgroup, u, k, count in msg.body["records"]:
                        if pid == workload.pid:
                            last_sample = time.monotonic()
                            counted += count
                            assert tid == workload.pid  # single-threaded
                            assert cgroup > 0
                            if u >= 0:
                                addresses.update(stacks[u])
    finally:
        if workload.returncode is None:
            workload.kill()
            workload.wait()
        sub.close()
    assert cpu_seconds is not None, "the workload did not finish"
    assert batches >= int(6 / DRAIN), "the collector publishes a batch every drain interval"
    expected = 100 * cpu_seconds
    assert expected > 200
    assert abs(counted - expected) <= 0.15 * expected + 10, (counted, expected)
    assert meta is not None, "no process metadata was published for the workload"
    assert meta["executable"] == str(binary) and meta["comm"] == "chain"
    own = [m for m in meta["mappings"] if m["path"] == str(binary)]
    assert own and all(m["build_id"] for m in own)
    readelf = subprocess.run(["readelf", "-n", str(binary)], capture_output=True, text=True).stdout
    assert own[0]["build_id"] in readelf
    in_binary = [a for a in addresses if any(m["start"] <= a < m["limit"] for m in own)]
    # The leaf runs almost all the time: most user stacks start inside the binary itself.
    assert len(in_binary) >= 3, (sorted(map(hex, addresses))[:10], own)


def test_kernel_frames_come_with_names(collector):
    run_dir, _, _ = collector
    sub = Subscriber(run_dir, wire.ENDPOINT_COLLECTOR, [wire.TOPIC_SAMPLES])
    # A workload that spends its time in the kernel: reading /dev/zero.
    busy = subprocess.Popen(["dd", "if=/dev/zero", "of=/dev/null", "bs=1M", "count=100000"],
                            stderr=subprocess.DEVNULL)
    try:
        # dd alternates between reading /dev/zero and writing /dev/null; a sample may land on
        # either side, so look at every named stack of the window, not only the first.
        named = []
        reading = None
        for msg in sub.messages(DRAIN + 6.0):
            for pid, _tid, _cg, _u, k, _count in msg.body["records"]:
                if pid == busy.pid and k >= 0:
                    names = [msg.body["kernel_symbols"][a] for a in msg.body["stacks"][k]]
                    if any(n != "[unknown]" for n in names):
                        named.append(names)
                        if any("zero" in n or "clear" in n or "read" in n for n in names):
                            reading = names
            if reading:
                break
    finally:
        busy.kill()
        busy.wait()
        sub.close()
    assert named, "no named kernel stack for a process living in the kernel"
    # The read side is where dd spends its time (clearing 1 MiB per call): its frames must be
    # there by name, with the syscall entry under them.
    assert reading, named[:5]
    assert any("syscall" in n.lower() for n in reading), reading


def test_a_late_subscriber_is_told_every_process_when_it_joins(collector, tmp_path):
    """The collector repeats process metadata on its own only every 5 minutes; a subscriber that
    joins (an aggregator restarting, a tap) is told at the next drain, from its XPUB socket.
    Two join in turn: the second is served too, not only the first subscription to a topic."""
    run_dir, _, _ = collector
    binary = build_chain_workload(tmp_path)
    workload = subprocess.Popen([str(binary), "0", "100"])
    try:
        time.sleep(3)  # first published before these subscribers exist
        for _ in range(2):
            sub = Subscriber(run_dir, wire.ENDPOINT_COLLECTOR, [wire.TOPIC_PROCESS])
            # A tick a second, and joins served at most every 2 s: 3 s, and margin.
            again = sub.wait_for(lambda m: m.body["pid"] == workload.pid, 6)
            sub.close()
            assert again is not None, "a late subscriber was not told of a running process"
            assert again.body["comm"] == binary.name[:15]
    finally:
        workload.kill()
        workload.wait()


def test_a_subscriber_that_subscribes_again_is_told_every_process_again(collector, tmp_path):
    """How a subscriber that lost process messages catches up (the aggregator does it on a gap):
    the same SUB socket subscribes to `process` once more, and the collector, whose XPUB sees
    the repeated subscription, sends every process again."""
    run_dir, _, _ = collector
    binary = build_chain_workload(tmp_path)
    sub = Subscriber(run_dir, wire.ENDPOINT_COLLECTOR, [wire.TOPIC_PROCESS])
    list(sub.messages(3))  # its own join is served (every process known then) before the start
    workload = subprocess.Popen([str(binary), "0", "100"])
    try:
        mine = lambda m: m.body["pid"] == workload.pid  # noqa: E731
        assert sub.wait_for(mine, 8) is not None, "the workload was never published"
        # Nothing more for it on its own for minutes: 4 s of quiet show it.
        assert sub.wait_for(mine, 4) is None, "published again without being asked"
        sub.sock.setsockopt(zmq.SUBSCRIBE, wire.TOPIC_PROCESS)
        again = sub.wait_for(mine, 6)
        assert again is not None, "a repeated subscription did not bring the processes again"
        assert again.body["comm"] == binary.name[:15]
    finally:
        sub.close()
        workload.kill()
        workload.wait()


def test_unwind_tables_of_sampled_binaries_are_kept_on_disk_for_the_next_start(collector,
                                                                              tmp_path):
    """The collector stores each table it builds under the file's build id in
    <cache-dir>/unwind (root only), where the next start reads it instead of building it."""
    run_dir, p, _ = collector
    with open(f"/proc/{p.pid}/environ", "rb") as fh:
        environ = dict(e.split(b"=", 1) for e in fh.read().split(b"\0") if b"=" in e)
    store = os.path.join(environ[b"PARCA_AGENT_CACHE_DIR"].decode(), "unwind")
    binary = build_chain_workload(tmp_path, name="stored")
    build_id = subprocess.run(["readelf", "-n", str(binary)], capture_output=True, text=True,
                              check=True).stdout.split("Build ID:")[1].split()[0]
    workload = subprocess.Popen([str(binary), "0", "100"])
    try:
        stored = wait_until(lambda: os.path.exists(os.path.join(store, build_id + ".table")), 20)
    finally:
        workload.kill()
        workload.wait()
    assert stored, sorted(os.listdir(store)) if os.path.isdir(store) else "no unwind folder"
    assert os.stat(store).st_mode & 0o777 == 0o700
    from services.collector.unwind.table_store import TableStore

    table = TableStore(store).load(build_id)
    assert table is not None and table.count > 10 and table.segments


def test_the_drain_interval_divides_the_window_and_shrinks_with_the_host():
    """Drains fall on window edges only if the interval divides the window: the window split
    evenly into parts no longer than the longest interval for the host, which holds about
    DRAIN_SAMPLES samples of every CPU (5 s at most, 1 s at least)."""
    from services.collector.service import drain_interval

    for window, cpus, interval in [(10, 2, 5.0), (10, 4, 2.5), (10, 8, 1.25), (10, 16, 1.0),
                                   (10, 1, 5.0), (10, 256, 1.0), (1, 2, 1.0), (2.5, 64, 2.5 / 3),
                                   (0.5, 2, 0.5), (1.5, 64, 0.75), (60, 2, 5.0), (7, 2, 3.5)]:
        assert drain_interval(window, cpus, 100) == pytest.approx(interval), (window, cpus)
        assert (window / interval) == pytest.approx(round(window / interval))
    # At 1000 Hz a 2-CPU host fills the maps ten times as fast.
    assert drain_interval(10, 2, 1000) == pytest.approx(1.0)


def test_drains_fall_on_multiples_of_the_interval_so_batches_do_not_straddle_windows(collector):
    """Windows are wall-clock multiples of their length, the drain interval divides it, and the
    aggregator places a batch by the middle of the time it covers: that is exact when every
    drain falls on a multiple of the interval."""
    run_dir, _, _ = collector
    sub = Subscriber(run_dir, wire.ENDPOINT_COLLECTOR, [wire.TOPIC_SAMPLES])
    busy = subprocess.Popen(["sh", "-c", "while :; do :; done"])  # so that every drain sends
    try:
        batches = [m.body for m in sub.messages(3 * DRAIN + 2.5)]
    finally:
        busy.kill()
        busy.wait()
        sub.close()
    assert len(batches) >= 3, len(batches)
    interval_ns = round(DRAIN * 1e9)
    late_ms = sorted((b["time_ns"] % interval_ns) / 1e6 for b in batches)
    # A drain can be late on a busy machine; a random phase would be under 100 ms one time in
    # ten (a second) or fifty (5 s).
    assert late_ms[len(late_ms) // 2] < 100, late_ms
    assert all(abs(b["duration_ns"] - interval_ns) < 5 * 10**8 for b in batches[1:]), \
        [b["duration_ns"] for b in batches]


@pytest.mark.parametrize("lives", [3.0, 0.6])
def test_a_process_shorter_than_a_drain_interval_is_read_while_it_lives(collector, tmp_path,
                                                                         lives):
    """Counts are drained every DRAIN seconds, but the kernel lists newly sampled processes
    and wakes the collector (a ring buffer record): a process that starts just after a drain
    and lives 3 s, or 0.6 s, has its metadata published before it exits (at the next drain it
    would be gone, its maps unreadable). With the list read on a 1 s timer instead, as before
    the wake-up, a 0.6 s process was read only when a tick fell inside its life."""
    if DRAIN < lives + 1:
        pytest.skip(f"the drain interval here is {DRAIN:g} s: a {lives:g} s process meets a "
                    "drain anyway")
    run_dir, _, _ = collector
    binary = build_chain_workload(tmp_path, name="brief")
    sub = Subscriber(run_dir, wire.ENDPOINT_COLLECTOR, [wire.TOPIC_PROCESS])
    time.sleep(0.5)  # the subscription is up
    # Start 0.2 s after a drain: the next one is DRAIN - 0.2 s away, after the process ends.
    time.sleep((0.2 - time.time() % DRAIN) % DRAIN)
    workload = subprocess.Popen([str(binary), f"{lives:g}", "100"])
    alive_when_told = None
    try:
        told = sub.wait_for(lambda m: m.body["pid"] == workload.pid, lives)
        alive_when_told = workload.poll() is None
        workload.wait(10)
    finally:
        if workload.poll() is None:
            workload.kill()
            workload.wait()
        sub.close()
    assert told is not None, "no metadata for a process that lived shorter than a drain interval"
    assert alive_when_told
    assert told.body["executable"] == str(binary)
    assert any(m["path"] == str(binary) and m["build_id"] for m in told.body["mappings"])


def test_dlopen_republishes_the_new_mapping(collector, tmp_path):
    """A process that loads a library after its first samples is re-read and republished."""
    run_dir, _, _ = collector
    sub = Subscriber(run_dir, wire.ENDPOINT_COLLECTOR, [wire.TOPIC_PROCESS])
    script = ("import ctypes, time\n"
              "t = time.time()\n"
              "while time.time() - t < 2: pass\n"
              "lib = ctypes.CDLL('libz.so.1')\n"
              "buf = ctypes.create_string_buffer(1 << 20)\n"
              "t = time.time()\n"
              "while time.time() - t < 6: lib.crc32(0, buf, 1 << 20)\n")
    workload = subprocess.Popen([PYTHON, "-c", script])
    try:
        seen = sub.wait_for(lambda m: m.body["pid"] == workload.pid and any(
            "libz" in mp["path"] for mp in m.body["mappings"]), 12)
    finally:
        workload.kill()
        workload.wait()
        sub.close()
    assert seen is not None, "the collector did not republish the process after dlopen"


def test_collector_refuses_without_root_in_one_line(tmp_path):
    env = service_env(str(tmp_path), str(tmp_path))
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                        PYTHON, "-m", "services.collector"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "root" in lines[0] and "Traceback" not in r.stderr, r.stderr


def test_proc_stat_survives_a_hostile_comm(tmp_path):
    pid_dir = tmp_path / "42"
    pid_dir.mkdir()
    hostile = "a) (b c) 1 2 <script>"
    fields = ["S"] + ["0"] * 18 + ["98765"] + ["0"] * 10
    (pid_dir / "stat").write_text(f"42 ({hostile}) " + " ".join(fields))
    st = proc.read_stat(42, str(tmp_path))
    assert st.comm == hostile and st.start_time == 98765


def test_maps_parsing_keeps_executable_file_mappings(tmp_path):
    text = (b"55d0c0000000-55d0c0001000 r--p 00000000 08:01 123 /usr/bin/x\n"
            b"55d0c0001000-55d0c0005000 r-xp 00001000 08:01 123 /usr/bin/x\n"
            b"7f0000000000-7f0000001000 r-xp 00000000 00:00 0 \n"
            b"7f0000100000-7f0000200000 r-xp 00002000 08:01 77 /tmp/gone with space (deleted)\n"
            b"7ffd00000000-7ffd00002000 r-xp 00000000 00:00 0 [vdso]\n"
            b"garbage line\n")
    entries = proc.parse_maps(text)
    assert [(e.start, e.offset, e.path, e.deleted) for e in entries] == [
        (0x55d0c0001000, 0x1000, "/usr/bin/x", False),
        (0x7f0000100000, 0x2000, "/tmp/gone with space", True),
        (0x7ffd00000000, 0, "[vdso]", False)]


def test_kernel_symbols_name_addresses_by_nearest_preceding_text_symbol(tmp_path):
    kallsyms = tmp_path / "kallsyms"
    kallsyms.write_text("ffffffff81000000 T _stext\nffffffff81000100 t helper\n"
                        "ffffffff81000200 D some_data\nffffffffc0000000 t mod_fn\t[mymod]\n"
                        "0000000000000000 T hidden_to_non_root\n")
    ks = KernelSymbols(str(kallsyms))
    assert ks.name(0xffffffff81000150) == "helper"
    assert ks.name(0xffffffff81000250) == "helper"  # data symbols do not name code
    assert ks.name(0xffffffffc0000010) == "mod_fn [mymod]"
    assert ks.name(0x10) == "[unknown]"


def _fake_process(root, pid: int, start_time: int, maps: list[tuple[int, int]]) -> None:
    """A /proc/<pid> fixture: stat with this start time, executable mappings of /usr/bin/x."""
    d = root / str(pid)
    d.mkdir(exist_ok=True)
    fields = ["S"] + ["0"] * 18 + [str(start_time)] + ["0"] * 10
    (d / "stat").write_text(f"{pid} (x) " + " ".join(fields))
    (d / "maps").write_text("".join(f"{a:x}-{b:x} r-xp 00000000 08:01 1 /usr/bin/x\n"
                                    for a, b in maps))
    (d / "cmdline").write_bytes(b"x\0")


def _counting_maps_reads(monkeypatch) -> list[int]:
    reads: list[int] = []
    real = proc.read_maps

    def read_maps(pid, path="/proc"):
        reads.append(pid)
        return real(pid, path)
    monkeypatch.setattr(proc, "read_maps", read_maps)
    return reads


def test_observe_checks_each_address_once_per_mappings(tmp_path, monkeypatch):
    """Addresses already found inside the mappings, or outside them in maps that had not
    changed (JIT code), do not make the process's maps be read again; a new one does."""
    _fake_process(tmp_path, 7, 100, [(0x1000, 0x2000)])
    table = ProcessTable(str(tmp_path), BuildIdCache(), None)
    reads = _counting_maps_reads(monkeypatch)
    assert table.observe(7, {0x1100}, now=0.0)["start_time"] == 100
    assert table.observe(7, {0x1100, 0x1200}, now=2.0) is None
    assert reads == [7]
    assert table.observe(7, {0x1100, 0x9000}, now=4.0) is None  # outside: read, unchanged
    assert reads == [7, 7]
    assert table.observe(7, {0x9000, 0x1200}, now=6.0) is None  # known outside: not again
    assert reads == [7, 7]
    assert table.observe(7, {0x9100}, now=8.0) is None  # a new address outside: read again
    assert reads == [7, 7, 7]
    # dlopen: the next new address is in a new mapping, published with it.
    _fake_process(tmp_path, 7, 100, [(0x1000, 0x2000), (0xa000, 0xb000)])
    body = table.observe(7, {0xa100}, now=10.0)
    assert [m["start"] for m in body["mappings"]] == [0x1000, 0xa000]


def test_observe_forgets_checked_addresses_when_the_pid_is_reused(tmp_path, monkeypatch):
    """The addresses checked belong to one process's mappings: a new process under the same
    pid starts with none, so an address inside the old process's mappings but outside the
    new one's still makes its maps be read."""
    _fake_process(tmp_path, 8, 100, [(0x1000, 0x2000)])
    table = ProcessTable(str(tmp_path), BuildIdCache(), None)
    assert table.observe(8, {0x1100}, now=0.0) is not None
    assert table.observe(8, {0x1100}, now=2.0) is None  # checked: inside
    _fake_process(tmp_path, 8, 200, [(0x5000, 0x6000)])  # exited; the pid names another
    body = table.observe(8, {0x5100}, now=4.0)
    assert body["start_time"] == 200 and [m["start"] for m in body["mappings"]] == [0x5000]
    reads = _counting_maps_reads(monkeypatch)
    _fake_process(tmp_path, 8, 200, [(0x5000, 0x6000), (0x1000, 0x2000)])  # maps it later
    body = table.observe(8, {0x1100}, now=6.0)  # checked under the old process, not this one
    assert reads == [8] and [m["start"] for m in body["mappings"]] == [0x1000, 0x5000]


def test_checked_addresses_stay_within_one_budget_for_all_processes(tmp_path, monkeypatch):
    """Each process's checked set is bounded, and so are all of them together: past the
    budget they start again (the maps are not read for that: the addresses are inside)."""
    monkeypatch.setattr(processes, "CHECKED_MAX", 300)
    monkeypatch.setattr(processes, "CHECKED_BUDGET", 1000)
    for pid in range(10, 16):
        _fake_process(tmp_path, pid, 100, [(0x10000, 0x20000)])
    table = ProcessTable(str(tmp_path), BuildIdCache(), None)
    reads = _counting_maps_reads(monkeypatch)
    for pid in range(10, 16):
        assert table.observe(pid, {0x10000}, now=0.0) is not None
    for pid in range(10, 16):
        assert table.observe(pid, set(range(0x10000, 0x10000 + 250)), now=2.0) is None
    sizes = [len(i.covered) + len(i.outside) for i in table.processes.values()]
    assert max(sizes) <= 300 and sum(sizes) <= 1000
    assert len(reads) == 6  # the first reads only: nothing was outside the mappings
    # Still correct after the reset: a new address outside is a reason to read the maps.
    assert table.observe(10, {0x30000}, now=4.0) is None and len(reads) == 7


def test_count_map_is_sized_for_what_the_cpus_can_sample():
    """Every drain walks every bucket of the count map: a small host gets a smaller map, still
    with many seconds of room; a large one keeps the cap."""
    assert counts_capacity(100, 2) == COUNTS_MIN == 4096  # 3,200 samples in 16 s: the floor
    assert counts_capacity(100, 8) == 16384  # 12,800
    assert counts_capacity(1000, 4) == 65536 == COUNTS_MAX  # 64,000 in 16 s
    assert counts_capacity(100, 256) == COUNTS_MAX
    assert counts_capacity(100, 16) == 32768  # 25,600 rounded up to a power of two


def test_agent_processes_are_told_by_their_run_dir_in_environ():
    """The collector builds no unwind tables for the agent's own processes, which it tells by
    the PARCA_AGENT_RUN_DIR they inherit: exactly that entry, read from the real /proc."""
    env = dict(os.environ, PARCA_AGENT_RUN_DIR="/run/agent-a")
    child = subprocess.Popen(["sleep", "30"], env=env)
    try:
        # Until its exec the child's environ is the parent's, and in the middle of it empty.
        deadline = time.monotonic() + 10
        while ((st := proc.read_stat(child.pid)) is None or st.comm != "sleep"
               or not proc.has_environ_entry(child.pid, b"PATH=" + os.environ["PATH"].encode())):
            assert time.monotonic() < deadline, "sleep did not start"
            time.sleep(0.01)
        assert proc.has_environ_entry(child.pid, b"PARCA_AGENT_RUN_DIR=/run/agent-a")
        assert not proc.has_environ_entry(child.pid, b"PARCA_AGENT_RUN_DIR=/run/agent")
        assert not proc.has_environ_entry(child.pid, b"PARCA_AGENT_RUN_DIR=/run/agent-b")
    finally:
        child.kill()
        child.wait()
    assert not proc.has_environ_entry(child.pid, b"PARCA_AGENT_RUN_DIR=/run/agent-a")  # gone


class ListingSampler:
    """Stands in for CpuSampler's new-process calls (the kernel side is tested with the real
    collector above): hands out what was listed, records what the collector marks and
    forgets."""

    unwinding = False

    class Signal:
        def clear(self):
            return False

    def __init__(self):
        self.new_process_signal = self.Signal()
        self.listed: dict[int, int] = {}
        self.marked: list[int] = []
        self.forgotten: list[int] = []

    def take_new_pids(self):
        listed, self.listed = self.listed, {}
        return listed

    def mark_known(self, pids):
        self.marked.extend(pids)

    def forget_known(self, pids):
        self.forgotten.extend(pids)


def test_an_unreadable_process_is_marked_known_and_retried_later(tmp_path, monkeypatch):
    """A process whose /proc cannot be read (here: a stat but no maps) is marked known all the
    same, or each of its samples would list it and wake the collector again (ten times a
    second); RETRY_UNREADABLE_AFTER later it leaves known_pids, so that it is tried again."""
    from services.collector import service
    from services.settings import build_parser, resolve

    proc_dir = tmp_path / "proc" / "4242"
    proc_dir.mkdir(parents=True)
    (proc_dir / "stat").write_text("4242 (x) S 1 4242 4242 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 "
                                   "500 0 0\n")
    settings = resolve(build_parser().parse_args(
        [f"--run-dir={tmp_path / 'run'}", f"--cache-dir={tmp_path / 'cache'}",
         f"--proc-path={tmp_path / 'proc'}"]), environ={})
    sampler = ListingSampler()
    collector = service.Collector(settings, sampler, service.runtime.Metrics("test"))
    # The clock is the time module's, shared with every thread: frozen only while the
    # collector's own calls run, not while its constructor starts threads or close stops them.
    clock = [1000.0]
    monkeypatch.setattr(service.time, "monotonic", lambda: clock[0])
    try:
        sampler.listed = {4242: 3}
        collector._read_new_processes()
        assert sampler.marked == [4242], "not marked known: its every sample would wake us"
        assert sampler.forgotten == []
        clock[0] += service.RETRY_UNREADABLE_AFTER - 0.1
        collector._read_new_processes()
        assert sampler.forgotten == []
        clock[0] += 0.2
        collector._read_new_processes()
        assert sampler.forgotten == [4242], "never tried again"
        collector._read_new_processes()
        assert sampler.forgotten == [4242], "forgotten twice"
    finally:
        monkeypatch.undo()
        collector.close()


def test_a_stack_checked_once_is_skipped_until_the_maps_change(tmp_path, monkeypatch):
    """observe_stacks: an unwound stack (stable id) whose addresses were all found inside the
    mappings is not gathered again for that process; one with an address outside them is,
    and a new process under the pid starts with none checked."""
    _fake_process(tmp_path, 9, 100, [(0x1000, 0x2000)])
    table = ProcessTable(str(tmp_path), BuildIdCache(), None)
    reads = _counting_maps_reads(monkeypatch)
    assert table.observe_stacks(9, [(1, [0x1100])], now=0.0) is not None
    assert table.observe_stacks(9, [(1, [0x1100]), (None, [0x1200])], now=2.0) is None
    assert table.processes[9].checked_stacks == {1}
    seen = []
    real = table.observe

    def observe(pid, addresses, now=None):
        seen.append(set(addresses))
        return real(pid, addresses, now)
    monkeypatch.setattr(table, "observe", observe)
    # Stack 1 is skipped; stack 2 has an address outside: read (unchanged), not marked
    # inside, but known outside now, so marked checked after it.
    assert table.observe_stacks(9, [(1, [0x1100]), (2, [0x9000, 0x1300])], now=4.0) is None
    assert seen == [{0x9000, 0x1300}] and reads == [9, 9]
    assert table.processes[9].checked_stacks == {1, 2}
    assert table.observe_stacks(9, [(1, [0x1100]), (2, [0x9000, 0x1300])], now=6.0) is None
    assert len(seen) == 1 and reads == [9, 9]  # nothing to check: only marked as seen
    assert table.processes[9].last_seen == 6.0
    # dlopen: a new stack with an address in a new mapping is still found.
    _fake_process(tmp_path, 9, 100, [(0x1000, 0x2000), (0xa000, 0xb000)])
    body = table.observe_stacks(9, [(1, [0x1100]), (3, [0xa100])], now=8.0)
    assert [m["start"] for m in body["mappings"]] == [0x1000, 0xa000]
    # A new ProcessInfo checks afresh: nothing skipped until its next drain has checked.
    assert table.processes[9].checked_stacks == set()
    assert table.observe_stacks(9, [(1, [0x1100]), (3, [0xa100])], now=10.0) is None
    assert seen[-1] == {0x1100, 0xa100} and table.processes[9].checked_stacks == {1, 3}


def test_only_checked_tells_a_drain_that_nothing_of_a_process_is_new(tmp_path, monkeypatch):
    """only_checked: true (and the process noted as sampled) only when every stack id is in its
    checked set; an unstable id (None), an unchecked one or an unknown pid sends the drain on
    to observe_stacks."""
    _fake_process(tmp_path, 9, 100, [(0x1000, 0x2000)])
    table = ProcessTable(str(tmp_path), BuildIdCache(), None)
    assert not table.only_checked(9, [1], 0.0)  # not read yet
    table.observe_stacks(9, [(1, [0x1100]), (2, [0x1200])], now=0.0)
    table.observe_stacks(9, [(1, [0x1100]), (2, [0x1200])], now=2.0)
    assert table.processes[9].checked_stacks == {1, 2}
    assert table.only_checked(9, [1, 2], 5.0) and table.processes[9].last_seen == 5.0
    assert table.only_checked(9, [2], 6.0)
    assert not table.only_checked(9, [1, None], 7.0)
    assert not table.only_checked(9, [1, 3], 7.0)
    assert table.processes[9].last_seen == 6.0
    assert not table.only_checked(10, [1], 7.0)


class RecordingBinaries:
    """Stands in for BinaryCache: records which files would be copied for the agent's user."""

    def __init__(self):
        self.requested: list[str] = []

    def request(self, build_id: str, source: str) -> None:
        self.requested.append(build_id)

    def path_for(self, build_id: str) -> str:
        return f"/cache/{build_id}"


def test_a_binary_the_agent_cannot_open_goes_to_the_cache_and_the_answer_is_kept_a_while():
    """A mapped file in a folder others cannot enter is offered to the binary cache (its
    cache_path set); libc, open to all, is not. The answer is remembered per file for
    READABLE_TTL: a process of the same binary started just after gets it without the stats,
    and a permission change shows once that time has passed."""
    import shutil
    import tempfile

    directory = tempfile.mkdtemp(prefix="parca-agent-private-", dir="/tmp")
    binary = build_chain_workload(directory)  # readable by all, then made private:
    os.chmod(directory, 0o700)
    table = ProcessTable("/proc", BuildIdCache(), RecordingBinaries())
    workloads = [subprocess.Popen([str(binary), "0", "100"]) for _ in range(3)]
    try:
        time.sleep(0.3)
        now = time.monotonic()

        def own(body):
            return [m for m in body["mappings"] if m["path"] == str(binary)]

        first = table.observe(workloads[0].pid, [], now=now)
        assert own(first) and all(m["cache_path"] == f"/cache/{m['build_id']}"
                                  for m in own(first))
        libc = [m for m in first["mappings"] if "libc.so" in m["path"]]
        assert libc and all(m["cache_path"] == "" for m in libc)
        assert table.binaries.requested == [own(first)[0]["build_id"]] * len(own(first))
        os.chmod(directory, 0o755)  # now open to all
        second = table.observe(workloads[1].pid, [], now=now + 1)
        assert all(m["cache_path"] for m in own(second)), "not remembered"
        third = table.observe(workloads[2].pid, [], now=now + processes.READABLE_TTL + 1)
        assert all(m["cache_path"] == "" for m in own(third)), "the change was never seen"
    finally:
        for w in workloads:
            w.kill()
            w.wait()
        shutil.rmtree(directory)
