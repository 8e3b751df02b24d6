"""The symbolizer against real ELF files compiled here: names, debug files, demangling, bad files,
build-id checks, and runtime addresses of real processes (from /proc/<pid>/maps)."""

from __future__ import annotations

import os
import random
import subprocess
from pathlib import Path

import pytest

from services.aggregator.demangle import demangle, demangle_all
from services.aggregator.profile_builder import MappingInfo
from services.aggregator.symbols import Symbolizer
from services.runtime import Metrics
from tests.conftest import require_tool
from tests.helpers import elf_fixtures as fx

PIE_BASE = 0x7F1234560000  # where a synthetic mapping loads the file


@pytest.fixture(scope="module")
def tools():
    for tool in ("gcc", "g++", "objcopy", "strip", "nm", "readelf"):
        require_tool(tool)


@pytest.fixture(scope="module")
def c_binary(tools, tmp_path_factory) -> Path:
    return fx.build_c(tmp_path_factory.mktemp("c"))


def mapping_for(path: Path, build_id: str | None = None) -> MappingInfo:
    """The mapping the kernel makes for the executable segment of `path` loaded at PIE_BASE."""
    offset, vaddr, size = fx.executable_segment(path)
    start = PIE_BASE + (vaddr & ~0xFFF)
    return MappingInfo(start, PIE_BASE + vaddr + size, offset & ~0xFFF, str(path),
                       fx.build_id(path) if build_id is None else build_id)


def names_of(symbolizer: Symbolizer, mapping: MappingInfo, candidates: list[str],
             addresses: list[int]) -> list[str | None]:
    frames = symbolizer.symbolize(mapping, candidates, addresses)
    assert set(frames) == set(addresses)
    return [None if frames[a] is None else frames[a].function for a in addresses]


def test_function_addresses_and_mid_function_addresses_give_names(c_binary):
    symbols = fx.function_addresses(c_binary)
    mapping = mapping_for(c_binary)
    addresses = [PIE_BASE + symbols["alpha"], PIE_BASE + symbols["beta"],
                 PIE_BASE + symbols["alpha"] + 5, PIE_BASE + symbols["beta"] + 20,
                 PIE_BASE + symbols["main"] + 1]
    assert names_of(Symbolizer(), mapping, [str(c_binary)], addresses) == \
        ["alpha", "beta", "alpha", "beta", "main"]


def test_address_outside_every_segment_gives_none(c_binary):
    mapping = mapping_for(c_binary)
    assert names_of(Symbolizer(), mapping, [str(c_binary)], [mapping.limit + 0x100000]) == [None]


def test_stripped_binary_finds_debug_file_by_build_id(c_binary, tmp_path):
    debug_dir = tmp_path / "debug"
    stripped, debug = fx.split_debug(c_binary, tmp_path / "bin", debug_dir=debug_dir)
    assert debug.is_file() and debug.parent.parent.name == ".build-id"
    symbols = fx.function_addresses(c_binary)
    mapping = mapping_for(stripped)
    addresses = [PIE_BASE + symbols["alpha"] + 3, PIE_BASE + symbols["beta"]]
    assert names_of(Symbolizer(debug_dirs=()), mapping, [str(stripped)], addresses) == \
        [None, None]  # the stripped file alone has no names for them
    found = Symbolizer(debug_dirs=(str(debug_dir),))
    assert names_of(found, mapping, [str(stripped)], addresses) == ["alpha", "beta"]


@pytest.mark.parametrize("subdir", ["", ".debug"])
def test_stripped_binary_finds_debug_file_by_debuglink(c_binary, tmp_path, subdir):
    stripped, debug = fx.split_debug(c_binary, tmp_path / "bin", debuglink=True)
    if subdir:
        (debug.parent / subdir).mkdir()
        debug = debug.rename(debug.parent / subdir / debug.name)
    symbols = fx.function_addresses(c_binary)
    assert names_of(Symbolizer(debug_dirs=()), mapping_for(stripped), [str(stripped)],
                    [PIE_BASE + symbols["beta"] + 7]) == ["beta"]


def test_debuglink_without_build_id_checks_the_crc(tools, tmp_path):
    flags = [*fx.FLAGS, "-Wl,--build-id=none"]
    binary = fx.build_c(tmp_path / "a", flags=flags)
    symbols = fx.function_addresses(binary)
    stripped, debug = fx.split_debug(binary, tmp_path / "bin", debuglink=True)
    mapping = mapping_for(stripped)
    assert mapping.build_id == ""
    address = PIE_BASE + symbols["alpha"]
    assert names_of(Symbolizer(debug_dirs=()), mapping, [str(stripped)], [address]) == ["alpha"]
    # A debug file of another build under the same name: its CRC differs, so it is not used.
    other = fx.build_c(tmp_path / "other", flags=[*flags, "-O0"])
    subprocess.run(["objcopy", "--only-keep-debug", str(other), str(debug)], check=True)
    assert names_of(Symbolizer(debug_dirs=()), mapping, [str(stripped)], [address]) == [None]


def test_cxx_names_come_out_demangled(tools, tmp_path):
    binary = fx.build_cxx(tmp_path)
    symbols = fx.function_addresses(binary)
    assert "_ZN2ns5Klass6methodEi" in symbols
    assert names_of(Symbolizer(), mapping_for(binary), [str(binary)],
                    [PIE_BASE + symbols["_ZN2ns5Klass6methodEi"] + 4]) == \
        ["ns::Klass::method(int)"]


def test_rust_names_lose_their_hash_and_escapes():
    assert demangle("_ZN4core3ptr13drop_in_place17h0123456789abcdefE") == \
        "core::ptr::drop_in_place"
    escaped = "_$LT$alloc..vec..Vec$LT$T$GT$$u20$as$u20$core..ops..drop..Drop$GT$"
    assert demangle(f"_ZN{len(escaped)}{escaped}4drop17h0123456789abcdefE") == \
        "<alloc::vec::Vec<T> as core::ops::drop::Drop>::drop"
    assert demangle("not_mangled") == "not_mangled"
    assert demangle("_Zgarbage") == "_Zgarbage"


def test_rust_v0_names_go_through_cxxfilt():
    require_tool("c++filt")
    assert demangle_all({"_RNvCs1234_7mycrate3foo"})["_RNvCs1234_7mycrate3foo"].endswith(
        "mycrate[3c1c0]::foo")


def bad_files(c_binary: Path, tmp: Path) -> dict[str, tuple[str, str]]:
    """name -> (path, expected reason)."""
    loop = tmp / "loop"
    os.symlink(loop, loop)
    fifo = tmp / "fifo"
    os.mkfifo(fifo)
    garbage = tmp / "garbage"
    garbage.write_bytes(random.Random(1).randbytes(8192))
    elf_garbage = tmp / "elf_garbage"
    elf_garbage.write_bytes(b"\x7fELF" + random.Random(2).randbytes(8192))
    # The section header table overwritten: the header points at garbage.
    data = bytearray(c_binary.read_bytes())
    shoff = int.from_bytes(data[0x28:0x30], "little")
    data[shoff:] = random.Random(3).randbytes(len(data) - shoff)
    bad_sections = tmp / "bad_sections"
    bad_sections.write_bytes(bytes(data))
    return {
        "truncated_header": (str(fx.truncated_copy(c_binary, tmp / "t1", 30)), "malformed"),
        "truncated_body": (str(fx.truncated_copy(c_binary, tmp / "t2", 3000)), "malformed"),
        "garbage": (str(garbage), "not_elf"),
        "elf_garbage": (str(elf_garbage), "malformed"),
        "bad_sections": (str(bad_sections), "malformed"),
        "missing": (str(tmp / "does-not-exist"), "not_found"),
        "symlink_loop": (str(loop), "unreadable"),
        "directory": (str(tmp), "unreadable"),
        "fifo": (str(fifo), "unreadable"),
    }


def test_bad_files_give_none_frames_and_count_an_error(c_binary, tmp_path):
    for name, (path, reason) in bad_files(c_binary, tmp_path).items():
        metrics = Metrics("aggregator")
        mapping = MappingInfo(PIE_BASE, PIE_BASE + 0x10000, 0, path, "")
        frames = Symbolizer(metrics).symbolize(mapping, [path], [PIE_BASE + 0x1100])
        assert frames == {PIE_BASE + 0x1100: None}, name
        assert metrics.get("symbolize_errors_total", reason=reason) == 1, name


def test_randomly_corrupted_binaries_never_raise(c_binary, tmp_path):
    original = c_binary.read_bytes()
    rng = random.Random(4)
    mapping = mapping_for(c_binary, build_id="")
    for i in range(30):
        data = bytearray(original)
        for _ in range(rng.randint(1, 64)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        path = tmp_path / f"corrupt{i}"
        path.write_bytes(bytes(data))
        frames = Symbolizer(Metrics("t")).symbolize(mapping, [str(path)], [mapping.start + 8])
        assert list(frames) == [mapping.start + 8]


def test_a_bad_file_is_parsed_once_per_version(c_binary, tmp_path):
    path = fx.truncated_copy(c_binary, tmp_path / "t", 3000)
    metrics = Metrics("t")
    symbolizer = Symbolizer(metrics)
    mapping = MappingInfo(PIE_BASE, PIE_BASE + 0x10000, 0, str(path), "")
    for _ in range(3):
        symbolizer.symbolize(mapping, [str(path)], [PIE_BASE])
    assert metrics.get("symbolize_errors_total", reason="malformed") == 3  # each call counts
    assert len(symbolizer._files) == 1


def test_build_id_mismatch_rejects_the_candidate(c_binary, tools, tmp_path):
    symbols = fx.function_addresses(c_binary)
    address = PIE_BASE + symbols["alpha"]
    metrics = Metrics("t")
    wrong = mapping_for(c_binary, build_id="00" * 20)
    assert names_of(Symbolizer(metrics), wrong, [str(c_binary)], [address]) == [None]
    assert metrics.get("symbolize_errors_total", reason="build_id_mismatch") == 1
    # Another file first (wrong build id), then the right one: the right one is used.
    other = fx.build_cxx(tmp_path)
    metrics = Metrics("t")
    assert names_of(Symbolizer(metrics), mapping_for(c_binary), [str(other), str(c_binary)],
                    [address]) == ["alpha"]
    assert metrics.get("symbolize_errors_total", reason="build_id_mismatch") == 1


def test_lru_evicts_and_still_answers(c_binary, tools, tmp_path):
    cxx = fx.build_cxx(tmp_path)
    metrics = Metrics("t")
    symbolizer = Symbolizer(metrics, max_files=1)
    c_addr = PIE_BASE + fx.function_addresses(c_binary)["alpha"]
    cxx_addr = PIE_BASE + fx.function_addresses(cxx)["_ZN2ns5Klass6methodEi"]
    for _ in range(2):
        assert names_of(symbolizer, mapping_for(c_binary), [str(c_binary)], [c_addr]) == ["alpha"]
        assert names_of(symbolizer, mapping_for(cxx), [str(cxx)], [cxx_addr]) == \
            ["ns::Klass::method(int)"]
    assert len(symbolizer._tables) == 1
    assert metrics.get("symbolize_cache_evictions_total") == 3


def run_and_read_address(argv: list[str]) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    try:
        return proc, int(proc.stdout.readline(), 16)
    except Exception:
        proc.kill()
        raise


def test_real_pie_process_addresses_from_proc_maps(c_binary):
    proc, alpha = run_and_read_address([str(c_binary), "wait"])
    try:
        start, limit, offset = fx.exec_mapping(proc.pid, c_binary, alpha)
    finally:
        proc.kill()
        proc.wait()
    assert alpha != fx.function_addresses(c_binary)["alpha"]  # PIE: runtime != file vaddr
    mapping = MappingInfo(start, limit, offset, str(c_binary), fx.build_id(c_binary))
    assert names_of(Symbolizer(), mapping, [str(c_binary)], [alpha, alpha + 6]) == \
        ["alpha", "alpha"]


def test_real_shared_library_addresses_from_proc_maps(tools, tmp_path):
    program, lib = fx.build_shared_library_program(tmp_path)
    proc, lib_work = run_and_read_address([str(program)])
    try:
        start, limit, offset = fx.exec_mapping(proc.pid, lib, lib_work)
    finally:
        proc.kill()
        proc.wait()
    mapping = MappingInfo(start, limit, offset, str(lib), fx.build_id(lib))
    file_offset, vaddr, _ = fx.executable_segment(lib)
    assert file_offset != vaddr  # (ld.so may load it at its link address: base 0)
    # The cache copy is missing: the host path (second candidate) answers.
    assert names_of(Symbolizer(), mapping, [str(tmp_path / "cache-copy"), str(lib)],
                    [lib_work, lib_work + 9]) == ["lib_work", "lib_work"]


def test_symbol_limit_keeps_some_names_and_counts(c_binary):
    metrics = Metrics("t")
    mapping = mapping_for(c_binary)
    frames = Symbolizer(metrics, max_symbols=1).symbolize(mapping, [str(c_binary)],
                                                          [mapping.start + 8])
    assert list(frames) == [mapping.start + 8]
    assert metrics.get("symbolize_errors_total", reason="too_many_symbols") == 1


def test_frames_are_cached_per_file_and_the_cache_stays_bounded(c_binary, monkeypatch):
    from services.aggregator.symbols import SymbolTable

    lookups = []
    real_lookup = SymbolTable.lookup
    monkeypatch.setattr(SymbolTable, "lookup", lambda self, v: lookups.append(v) or
                        real_lookup(self, v))
    symbols = fx.function_addresses(c_binary)
    mapping = mapping_for(c_binary)
    addresses = [PIE_BASE + symbols["alpha"] + 5, PIE_BASE + symbols["beta"],
                 PIE_BASE + symbols["alpha"] + 5, mapping.limit + 0x100000]
    cached = Symbolizer()
    for _ in range(3):
        got = cached.frames(mapping, [str(c_binary)], addresses)
        assert [f and f.function for f in got] == ["alpha", "beta", "alpha", None]
    assert len(lookups) == 2  # each address inside a segment once, then from the cache
    # The same file mapped elsewhere in another process: the same file offsets, cached.
    moved = MappingInfo(mapping.start + 0x10000000, mapping.limit + 0x10000000, mapping.offset,
                        mapping.path, mapping.build_id)
    assert [f and f.function for f in cached.frames(moved, [str(c_binary)], [
        a + 0x10000000 for a in addresses])] == ["alpha", "beta", "alpha", None]
    assert len(lookups) == 2
    tiny = Symbolizer(max_frames=2)
    for _ in range(3):
        assert names_of(tiny, mapping, [str(c_binary)], addresses) == \
            ["alpha", "beta", "alpha", None]
        assert tiny._cached_frames <= 3


def test_parsed_tables_are_kept_on_disk_and_read_back_by_the_next_start(c_binary, tmp_path):
    """A restarted aggregator reads each table it parsed before from <cache-dir>/symbols by
    build id instead of parsing the ELF file again: here the file is gone by then, and the
    names still come."""
    from services.aggregator.symbol_store import SymbolStore

    copy = tmp_path / "bin" / "copy"
    copy.parent.mkdir()
    copy.write_bytes(c_binary.read_bytes())
    symbols = fx.function_addresses(c_binary)
    mapping = mapping_for(copy)
    addresses = [PIE_BASE + symbols["alpha"] + 3, PIE_BASE + symbols["beta"],
                 PIE_BASE + symbols["main"]]
    store_dir = tmp_path / "symbols"
    first = Symbolizer(store=SymbolStore(str(store_dir)))
    assert names_of(first, mapping, [str(copy)], addresses) == ["alpha", "beta", "main"]
    stored = store_dir / f"{mapping.build_id}.symbols"
    assert stored.is_file() and os.stat(store_dir).st_mode & 0o777 == 0o700
    copy.unlink()
    metrics = Metrics("t")
    second = Symbolizer(store=SymbolStore(str(store_dir), metrics=metrics))
    assert names_of(second, mapping, [str(copy)], addresses) == ["alpha", "beta", "main"]
    assert metrics.get("symbol_tables_loaded_from_disk_total") == 1
    # The whole table survives the trip, not only these names.
    original = Symbolizer()._load(str(c_binary), str(c_binary))
    back = SymbolStore(str(store_dir)).load(mapping.build_id)
    assert (back.build_id, back.segments, back.starts, back.ends, back.names) == \
        (original.build_id, original.segments, original.starts, original.ends, original.names)


def test_a_damaged_stored_table_is_parsed_again(c_binary, tmp_path):
    from services.aggregator.symbol_store import SymbolStore

    symbols = fx.function_addresses(c_binary)
    mapping = mapping_for(c_binary)
    addresses = [PIE_BASE + symbols["alpha"], PIE_BASE + symbols["beta"]]
    store_dir = tmp_path / "symbols"
    names_of(Symbolizer(store=SymbolStore(str(store_dir))), mapping, [str(c_binary)], addresses)
    stored = store_dir / f"{mapping.build_id}.symbols"
    for damage in (lambda b: b[:len(b) // 2], lambda b: b[:40] + bytes([b[40] ^ 1]) + b[41:],
                   lambda b: b""):
        good = stored.read_bytes()
        stored.write_bytes(damage(good))
        metrics = Metrics("t")
        again = Symbolizer(store=SymbolStore(str(store_dir), metrics=metrics))
        assert names_of(again, mapping, [str(c_binary)], addresses) == ["alpha", "beta"]
        assert metrics.get("symbol_tables_corrupt_total") == 1
        assert stored.read_bytes() == good  # parsed again and stored again, whole


def test_a_stored_table_gives_way_to_a_debug_file_installed_since(c_binary, tmp_path):
    """A stripped binary's table, stored without names for its static functions, is parsed
    again once a debug file for its build id exists: installing a -dbgsym package helps a
    running node at its next aggregator start, not never."""
    from services.aggregator.symbol_store import SymbolStore

    debug_dir = tmp_path / "debug"
    stripped, _ = fx.split_debug(c_binary, tmp_path / "bin", debug_dir=debug_dir)
    symbols = fx.function_addresses(c_binary)
    mapping = mapping_for(stripped)
    addresses = [PIE_BASE + symbols["alpha"] + 3, PIE_BASE + symbols["beta"]]
    store = SymbolStore(str(tmp_path / "symbols"))
    before = Symbolizer(debug_dirs=(str(tmp_path / "none"),), store=store)
    assert names_of(before, mapping, [str(stripped)], addresses) == [None, None]
    after = Symbolizer(debug_dirs=(str(debug_dir),), store=store)
    assert names_of(after, mapping, [str(stripped)], addresses) == ["alpha", "beta"]
    assert store.load(mapping.build_id).from_debug
