"""Unwind tables from .eh_frame: rows of known functions, the caches, and per-process loading
(against a recording fake of the BPF maps)."""

from __future__ import annotations

import os
import re
import subprocess
import time

import pytest

from services.collector.unwind import eh_frame
from services.collector.unwind.eh_frame import (
    CFA_NONE,
    CFA_RBP,
    CFA_RSP,
    CFA_STACK_END,
    TableError,
    build_table,
)
from services.collector.unwind.loader import UnwindLoader
from services import build_id_store
from services.collector.unwind import table_store
from services.collector.unwind.table_store import TableStore
from services.collector.unwind.tables import RangeAllocator, TableCache
from tests.conftest import require_tool
from tests.helpers.workload import compile_c

FRAMED_SOURCE = r"""
#include <unistd.h>
__attribute__((noinline)) long framed(long n) {
    volatile long a[4]; a[0] = n; a[1] = a[0] * 3; return a[1];
}
__attribute__((noinline)) long pushes(long n) {
    /* Enough live values across a call that gcc saves callee-saved registers. */
    long a = n * 3, b = n * 5, c = n * 7;
    framed(a);
    return a + b + c + framed(b + c);
}
int main(int argc, char **argv) {
    if (argc > 1) for (;;) pause();
    return (int)(framed(argc) + pushes(argc));
}
"""


def _symbols(binary) -> dict[str, int]:
    out = subprocess.run(["nm", str(binary)], capture_output=True, text=True, check=True).stdout
    return {parts[2]: int(parts[0], 16) for parts in (l.split() for l in out.splitlines())
            if len(parts) == 3}


def _instructions(binary, function: str) -> list[tuple[int, str]]:
    out = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(binary)],
                         capture_output=True, text=True, check=True).stdout
    body = out.split(f"<{function}>:\n", 1)[1].split("\n\n", 1)[0]
    return [(int(m.group(1), 16), m.group(2).strip())
            for m in re.finditer(r"^\s*([0-9a-f]+):\s+(.*)$", body, re.MULTILINE)]


@pytest.fixture(scope="module")
def framed_binary(tmp_path_factory):
    require_tool("gcc")
    require_tool("objdump")
    out = tmp_path_factory.mktemp("unwind") / "framed"
    return compile_c(FRAMED_SOURCE, out, ["-O2", "-fno-omit-frame-pointer", "-fno-inline"])


def test_rows_follow_a_frame_pointer_prologue(framed_binary):
    table = build_table(str(framed_binary))
    insns = _instructions(framed_binary, "framed")
    entry = insns[0][0]
    push = next(a for a, text in insns if text.startswith("push") and "%rbp" in text)
    mov = next(a for a, text in insns if text.startswith("mov") and "%rsp,%rbp" in text)
    after_mov = next(a for a, _ in insns if a > mov)
    # At entry the return address is on top of the stack: CFA = rsp + 8, rbp not saved yet.
    assert table.row_at(entry)[1:] == (CFA_RSP, 8, 0)
    # After push %rbp: CFA = rsp + 16 and the caller's rbp sits at CFA - 16.
    after_push = next(a for a, _ in insns if a > push)
    assert table.row_at(after_push)[1:] == (CFA_RSP, 16, -16)
    # After mov %rsp,%rbp the CFA follows rbp.
    assert table.row_at(after_mov)[1:] == (CFA_RBP, 16, -16)


def test_rows_of_a_function_without_frame_pointer(tmp_path):
    require_tool("gcc")
    require_tool("objdump")
    binary = compile_c(FRAMED_SOURCE, tmp_path / "omit", ["-O2", "-fomit-frame-pointer",
                                                          "-fno-inline"])
    table = build_table(str(binary))
    insns = _instructions(binary, "pushes")
    assert table.row_at(insns[0][0])[1:3] == (CFA_RSP, 8)
    # Every push or sub of rsp moves the CFA offset by as much; rbp stays where it was.
    depth = 8
    for (address, text), (following, _) in zip(insns, insns[1:]):
        if text.startswith("call"):
            break
        if text.startswith("push"):
            depth += 8
        m = re.match(r"sub\s+\$0x([0-9a-f]+),%rsp", text)
        if m:
            depth += int(m.group(1), 16)
        row = table.row_at(following)
        assert row[1:3] == (CFA_RSP, depth), (hex(following), text, row)
    assert depth > 8, "the function saved nothing: the test proves little"


def test_start_is_the_outermost_frame_and_gaps_are_not_covered(framed_binary):
    table = build_table(str(framed_binary))
    symbols = _symbols(framed_binary)
    assert table.row_at(symbols["_start"])[1] == CFA_STACK_END
    # After the last FDE no rule applies.
    last_pc = eh_frame.ROW.unpack_from(table.rows, (table.count - 1) * eh_frame.ROW.size)[0]
    assert table.row_at(last_pc)[1] == CFA_NONE
    assert table.row_at(0) is None
    rows = [eh_frame.ROW.unpack_from(table.rows, i * 8) for i in range(table.count)]
    assert [r[0] for r in rows] == sorted(r[0] for r in rows)


def test_debug_frame_rows_join_the_eh_frame_ones(tmp_path):
    require_tool("gcc")
    binary = compile_c(FRAMED_SOURCE, tmp_path / "debugframe",
                       ["-O2", "-g", "-fno-asynchronous-unwind-tables", "-fno-omit-frame-pointer",
                        "-fno-inline"])
    sections = subprocess.run(["readelf", "-S", "-W", str(binary)], capture_output=True,
                              text=True, check=True).stdout
    assert ".debug_frame" in sections
    table = build_table(str(binary))
    framed = _symbols(binary)["framed"]
    assert table.row_at(framed)[1:] == (CFA_RSP, 8, 0)
    assert table.row_at(_symbols(binary)["_start"])[1] == CFA_STACK_END


def test_python_interpreter_table_is_almost_all_supported_rows():
    table = build_table("/usr/bin/python3")
    assert table.count > 10000
    assert table.unsupported_rows < table.count / 1000
    assert table.vaddr(table.segments[0][0]) == table.segments[0][2]


def test_files_without_a_table_raise_one_reason(tmp_path):
    text = tmp_path / "text"
    text.write_text("not an ELF file")
    with pytest.raises(TableError) as e:
        build_table(str(text))
    assert e.value.reason == "malformed"
    with pytest.raises(TableError) as e:
        build_table(str(tmp_path / "missing"))
    assert e.value.reason == "unreadable"
    truncated = tmp_path / "truncated"
    truncated.write_bytes(open("/usr/bin/python3", "rb").read(70000))
    with pytest.raises(TableError):
        build_table(str(truncated))


def test_range_allocator_reuses_and_merges_freed_slices():
    space = RangeAllocator(100)
    a, b, c = space.allocate(40), space.allocate(40), space.allocate(20)
    assert (a, b, c) == (0, 40, 80) and space.allocate(1) is None
    space.release(a, 40)
    space.release(b, 40)
    assert space.allocate(80) == 0, "neighbouring free slices merge into one"
    space.release(0, 80)
    space.release(c, 20)
    assert space.available == 100 and space.allocate(100) == 0


def test_table_cache_is_bounded_and_remembers_failures():
    built = []

    def build(path):
        built.append(path)
        if path == "bad":
            raise TableError("no_cfi")
        return eh_frame.UnwindTable(rows=b"\0" * 800, fdes=1, unsupported_rows=0)

    cache = TableCache(max_bytes=2000, build=build)
    assert cache.get("a", "a").count == 100
    cache.get("b", "b")
    cache.get("a", "a")  # a is now the most recent
    cache.get("c", "c")  # 2400 bytes > 2000: b goes
    assert cache.bytes == 1600 and built == ["a", "b", "c"]
    cache.get("b", "b")
    assert built[-1] == "b"
    assert cache.get("x", "bad") is None and cache.get("x", "bad") is None
    assert built.count("bad") == 1 and cache.failures == {"no_cfi": 1}


class Counting:
    def __init__(self):
        self.counts: dict[str, float] = {}

    def inc(self, name, amount=1, **_labels):
        self.counts[name] = self.counts.get(name, 0) + amount


def test_tables_stored_on_disk_are_read_back_by_a_new_collector_and_not_built_again(tmp_path):
    """A real table (this machine's python3, built from its .eh_frame) goes to disk under its
    build id; a fresh TableCache, as after a restart, reads it back row for row instead of
    building it. A key that is not a build id (a file without one) stays in memory only."""
    built = []

    def build(path):
        built.append(path)
        return eh_frame.build_table(path)

    python = os.path.realpath("/usr/bin/python3")
    first = TableCache(build=build, store=TableStore(str(tmp_path / "unwind")))
    table = first.get("ab" * 20, python)
    assert table is not None and table.count > 1000 and built == [python]
    assert oct(os.stat(tmp_path / "unwind").st_mode & 0o777) == "0o700"
    metrics = Counting()
    second = TableCache(build=build, store=TableStore(str(tmp_path / "unwind"), metrics=metrics))
    again = second.get("ab" * 20, python)
    assert built == [python], "the table was built again instead of read from disk"
    assert (again.rows, again.fdes, again.unsupported_rows, again.segments) == \
        (table.rows, table.fdes, table.unsupported_rows, table.segments)
    assert again.row_at(table.segments[0][2] + 0x100) == table.row_at(table.segments[0][2] + 0x100)
    assert metrics.counts == {"unwind_tables_loaded_from_disk_total": 1}
    second.get("file:1:2:3", python)
    assert built == [python, python] and os.listdir(tmp_path / "unwind") == ["ab" * 20 + ".table"]


@pytest.mark.parametrize("damage", ["flip", "truncate", "version", "empty"])
def test_a_damaged_stored_table_is_deleted_counted_and_built_again(tmp_path, damage):
    rows = eh_frame.ROW.pack(0x1000, 16, 1, -2) + eh_frame.ROW.pack(0x1010, 8, 1, 0)
    table = eh_frame.UnwindTable(rows=rows, fdes=2, unsupported_rows=0,
                                 segments=((0, 0x2000, 0x1000),))
    store = TableStore(str(tmp_path))
    store.save("cd" * 20, table)
    path = tmp_path / ("cd" * 20 + ".table")
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x40
    elif damage == "truncate":
        data = data[:-5]
    elif damage == "version":  # a file of another format version, with a right CRC
        old = table_store.VERSION
        table_store.VERSION = old + 1
        try:
            data = bytearray(build_id_store.frame(TableStore.encode(table)))
        finally:
            table_store.VERSION = old
    else:
        data = bytearray()
    path.write_bytes(bytes(data))
    metrics = Counting()
    store = TableStore(str(tmp_path), metrics=metrics)
    assert store.load("cd" * 20) is None
    assert not path.exists() and metrics.counts == {"unwind_tables_corrupt_total": 1}
    built = []
    cache = TableCache(build=lambda p: built.append(p) or table, store=store)
    assert cache.get("cd" * 20, "/x").rows == rows and built == ["/x"]
    assert TableStore(str(tmp_path)).load("cd" * 20).rows == rows  # stored again, whole


def test_the_table_store_is_bounded_least_recently_used_out_first(tmp_path, monkeypatch):
    def table(n):
        return eh_frame.UnwindTable(rows=eh_frame.ROW.pack(n, 8, 1, 0) * 100, fdes=1,
                                    unsupported_rows=0)

    size = len(build_id_store.frame(TableStore.encode(table(1))))
    store = TableStore(str(tmp_path), max_bytes=3 * size)
    for i, build_id in enumerate(["aa", "bb", "cc"]):
        store.save(build_id, table(i))
        os.utime(tmp_path / f"{build_id}.table", (1000 + i, 1000 + i))
    assert store.load("aa") is not None  # used: now the most recent
    store.save("dd", table(3))  # one too many: bb, the least recently used, goes
    assert sorted(os.listdir(tmp_path)) == ["aa.table", "cc.table", "dd.table"]
    # A table used from memory keeps its file too: cc was stored first, but is in use.
    cache = TableCache(build=lambda p: table(9), store=store)
    os.utime(tmp_path / "cc.table", (1000, 1000))
    cache.get("cc", "/x")  # read from disk into memory (which touches it)
    os.utime(tmp_path / "cc.table", (1000, 1000))
    cache.get("cc", "/x")  # from memory, just after the read: no second touch
    assert os.stat(tmp_path / "cc.table").st_mtime == 1000
    later = time.monotonic() + table_store.TOUCH_EVERY
    monkeypatch.setattr(build_id_store.time, "monotonic", lambda: later)  # the touch clock
    cache.get("cc", "/x")  # from memory an hour on: touched
    assert os.stat(tmp_path / "cc.table").st_mtime > 1000
    os.utime(tmp_path / "aa.table", (2000, 2000))
    store.save("ee", table(5))  # aa goes, not cc
    assert sorted(os.listdir(tmp_path)) == ["cc.table", "dd.table", "ee.table"]
    assert store.bytes == 3 * size
    store.save("../../etc/x", table(4))  # not a build id: never a path
    store.save("", table(4))
    assert sorted(os.listdir(tmp_path)) == ["cc.table", "dd.table", "ee.table"]


class RecordingMaps:
    """Stands in for CpuSampler's unwind map writes."""

    def __init__(self):
        self.rows: dict[int, bytes] = {}
        self.mappings: dict[int, tuple] = {}
        self.processes: dict[int, tuple[int, int]] = {}

    def write_unwind_rows(self, first, rows):
        for i in range(len(rows) // 8):
            self.rows[first + i] = rows[i * 8:(i + 1) * 8]

    def write_unwind_mappings(self, first, mappings):
        for i, m in enumerate(mappings):
            self.mappings[first + i] = m

    def set_unwind_process(self, pid, first, count):
        self.processes[pid] = (first, count)

    def drop_unwind_process(self, pid):
        del self.processes[pid]

    def read_unwind_stats(self):
        return {}

    def table_id_of(self, pid, address):
        first, count = self.processes[pid]
        for i in range(first, first + count):
            start, end, *_, table_id = self.mappings[i]
            if start <= address < end:
                return table_id
        return None

    def mapping_of(self, pid, address):
        first, count = self.processes[pid]
        for i in range(first, first + count):
            start, end, bias, first_row, rows, _table_id = self.mappings[i]
            if start <= address < end:
                return bias, first_row, rows
        return None


def test_loader_places_each_file_once_and_drops_it_with_its_last_process(framed_binary):
    maps = RecordingMaps()
    loader = UnwindLoader(maps)
    a = subprocess.Popen([str(framed_binary), "wait"])
    b = subprocess.Popen([str(framed_binary), "wait"])
    c = None
    try:
        time.sleep(0.2)
        assert loader.load(a.pid) and loader.load(b.pid)
        table = build_table(str(framed_binary))
        framed = _symbols(framed_binary)["framed"]
        in_a, in_b = (_runtime(p.pid, framed_binary, table, framed) for p in (a, b))
        bias, first_row, rows = maps.mapping_of(a.pid, in_a)
        assert rows == table.count and in_a - bias == framed
        assert maps.mapping_of(b.pid, in_b)[1:] == (first_row, rows), "one copy for both"
        table_id = maps.table_id_of(a.pid, in_a)
        assert table_id and maps.table_id_of(b.pid, in_b) == table_id
        in_bpf = b"".join(maps.rows[first_row + i] for i in range(rows))
        assert in_bpf == table.rows
        libc_users = [r for k, r in loader.resident.items() if len(r.users) == 2]
        assert len(libc_users) >= 2  # the binary and libc, at least
        a.kill()
        a.wait()
        assert loader.prune() == 1 and a.pid not in maps.processes
        assert all(r.users == {b.pid} for r in loader.resident.values())
        b.kill()
        b.wait()
        loader.prune()
        assert loader.resident == {} and loader.rows.available == loader.rows.capacity
        assert loader.mapping_slots.available == loader.mapping_slots.capacity
        # Placed again in the same rows, the table gets a new id: the kernel's row cache is
        # keyed by it, and its entries for the old placement must never match the new one.
        c = subprocess.Popen([str(framed_binary), "wait"])
        time.sleep(0.2)
        assert loader.load(c.pid)
        in_c = _runtime(c.pid, framed_binary, table, framed)
        assert maps.mapping_of(c.pid, in_c)[1] == first_row
        assert maps.table_id_of(c.pid, in_c) not in (None, 0, table_id)
    finally:
        for p in (a, b, c):
            if p is None:
                continue
            p.kill()
            p.wait()


def _runtime(pid: int, binary, table, vaddr: int) -> int:
    """Where the file's virtual address vaddr is in pid, from its maps."""
    for line in open(f"/proc/{pid}/maps"):
        fields = line.split()
        if fields[-1] == str(binary) and "x" in fields[1]:
            start = int(fields[0].split("-")[0], 16)
            return start + vaddr - table.vaddr(int(fields[2], 16))
    raise AssertionError("the binary is not mapped")


def test_the_dwarf_unwind_flag_and_its_environment_variable():
    from services.settings import build_parser, resolve

    assert resolve(build_parser().parse_args([]), environ={}).dwarf_unwind is True
    off = resolve(build_parser().parse_args([]), environ={"PARCA_AGENT_DWARF_UNWIND": "false"})
    assert off.dwarf_unwind is False
    assert resolve(build_parser().parse_args(["--dwarf-unwind=false"]), environ={}).dwarf_unwind \
        is False


def test_loader_watches_loaded_processes_and_drops_one_that_exited_unreaped(framed_binary):
    """Exits come from the pidfd watch: a zombie (killed, not yet reaped) still has a stat with
    its start time, and is dropped all the same; a failed load leaves no watch behind."""
    maps = RecordingMaps()
    loader = UnwindLoader(maps)
    a = subprocess.Popen([str(framed_binary), "wait"])
    try:
        time.sleep(0.2)
        assert loader.load(a.pid) and loader.exits.watched(a.pid)
        assert loader.prune() == 0 and a.pid in maps.processes
        a.kill()  # a zombie until a.wait()
        deadline = time.monotonic() + 5
        while not loader.exits.exited() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert loader.prune() == 1 and a.pid not in maps.processes
        assert not loader.exits.watched(a.pid) and len(loader.exits) == 0
        assert loader.resident == {} and loader.rows.available == loader.rows.capacity
    finally:
        a.kill()
        a.wait()
    assert not loader.load(a.pid) and len(loader.exits) == 0
    loader.stop()


def test_loader_uses_the_process_tables_reading_and_reads_itself_when_it_does_not_fit(
        framed_binary, monkeypatch):
    """The collector hands the loader the maps and file identities its process table just read
    (MapsSnapshot): the loader then neither reads the maps nor stats map_files again, and
    places exactly what it would have placed reading them itself. A snapshot of another
    process under the same pid (start time) or an old one is not used."""
    import dataclasses

    from services.collector import proc
    from services.collector.build_id import BuildIdCache
    from services.collector.processes import ProcessTable
    from services.collector.unwind import loader as loader_module

    a = subprocess.Popen([str(framed_binary), "wait"])
    own = UnwindLoader(RecordingMaps())
    try:
        time.sleep(0.2)
        table = ProcessTable("/proc", BuildIdCache(), None)
        assert table.observe(a.pid, ()) is not None
        snapshot = table.take_maps(a.pid)
        assert snapshot is not None and table.take_maps(a.pid) is None  # handed over once
        assert any(path.startswith("/") for path in (e.path for e in snapshot.entries))

        reads, lookups = [], []
        read_maps = proc.read_maps
        monkeypatch.setattr(loader_module.proc, "read_maps",
                            lambda *args: reads.append(args) or read_maps(*args))
        maps = RecordingMaps()
        loader = UnwindLoader(maps)
        lookup = loader.build_ids.lookup
        monkeypatch.setattr(loader.build_ids, "lookup",
                            lambda source: lookups.append(source) or lookup(source))
        assert loader.load(a.pid, snapshot)
        assert reads == [] and lookups == []
        # The same placement as a loader that reads the process itself.
        assert own.load(a.pid) and len(reads) == 1
        first, count = maps.processes[a.pid]
        own_first, own_count = own.sampler.processes[a.pid]
        assert [maps.mappings[i] for i in range(first, first + count)] == \
            [own.sampler.mappings[i] for i in range(own_first, own_first + own_count)]
        assert sum(1 for m in maps.mappings.values() if m[4]) >= 2  # rows: binary and libc

        reused = dataclasses.replace(snapshot, start_time=snapshot.start_time + 1)
        assert loader.load(a.pid, reused) and len(reads) == 2 and lookups
        old = dataclasses.replace(snapshot, read_at=time.monotonic() - loader_module.MAPS_FRESH)
        assert loader.load(a.pid, old) and len(reads) == 3

        # Through the loader's own thread, as the collector requests it.
        threaded = UnwindLoader(RecordingMaps())
        threaded.start()
        try:
            threaded.request(a.pid, 1, dataclasses.replace(snapshot, read_at=time.monotonic()))
            deadline = time.monotonic() + 10
            while a.pid not in threaded.sampler.processes and time.monotonic() < deadline:
                time.sleep(0.02)
            assert a.pid in threaded.sampler.processes and len(reads) == 3
        finally:
            threaded.stop()
        loader.stop()
    finally:
        a.kill()
        a.wait()
        own.stop()
