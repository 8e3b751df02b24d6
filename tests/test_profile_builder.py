"""ProfileBuilder's output, read back with the generated protobuf code and with `go tool pprof`
(-symbolize=none, so pprof shows only what the profile carries)."""

from __future__ import annotations

import gzip
import os
import subprocess
from collections import Counter

import pytest

import services.proto_gen  # noqa: F401  (puts the generated packages on sys.path)
from pprof import profile_pb2
from services.aggregator.profile_builder import (
    STORE_BELOW,
    Frame,
    MappingInfo,
    ProfileBuilder,
    gzip_bytes,
)
from tests.conftest import require_tool

PERIOD = 10_000_000
TIME = 1_700_000_000_000_000_000
EXE = MappingInfo(0x555555554000, 0x555555556000, 0x1000, "/usr/bin/app", "ab" * 20)
LIBC = MappingInfo(0x7F0000000000, 0x7F0000100000, 0x28000, "/lib/libc.so.6", "cd" * 20)
LEAF = (EXE, 0x555555554100, Frame("leaf", "/src/app.c", 12))
MAIN = (EXE, 0x555555554200, Frame("main", "/src/app.c", 30))
MAIN_AGAIN = (EXE, 0x555555554280, Frame("main", "/src/app.c", 31))  # same function
LIBC_UNKNOWN = (LIBC, 0x7F0000000500, None)
UNMAPPED = (None, 0x1234, None)
SYSCALL = (0xFFFFFFFF81001000, "do_syscall_64")
ENTRY = (0xFFFFFFFF81F00010, "entry_SYSCALL_64")


def example() -> ProfileBuilder:
    builder = ProfileBuilder(PERIOD, TIME, 10_000_000_000)
    labels = {"pid": 42, "comm": "app", "thread": 43}
    builder.add_sample([LEAF, MAIN, LIBC_UNKNOWN], [SYSCALL, ENTRY], 3, labels)
    builder.add_sample([LEAF, MAIN, LIBC_UNKNOWN], [SYSCALL, ENTRY], 4, dict(labels))  # merges
    # Equal but distinct MappingInfo objects must land on the same mapping.
    builder.add_sample([(MappingInfo(*vars(EXE).values()), LEAF[1], LEAF[2]), MAIN_AGAIN], [], 2,
                       {"pid": 42, "comm": "app", "thread": 44})
    builder.add_sample([UNMAPPED, MAIN], [], 5, {"pid": 7, "comm": "other"})
    return builder


def parse(blob: bytes) -> profile_pb2.Profile:
    profile = profile_pb2.Profile()
    profile.ParseFromString(gzip.decompress(blob))
    return profile


@pytest.fixture(scope="module")
def profile_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("pprof") / "cpu.pb.gz"
    path.write_bytes(example().build())
    return path


def test_header_sample_types_and_period():
    builder = example()
    assert builder.sample_count == 14
    p = parse(builder.build())
    s = p.string_table
    assert [(s[t.type], s[t.unit]) for t in p.sample_type] == \
        [("samples", "count"), ("cpu", "nanoseconds")]
    assert (s[p.period_type.type], s[p.period_type.unit]) == ("cpu", "nanoseconds")
    assert (p.period, p.time_nanos, p.duration_nanos) == (PERIOD, TIME, 10_000_000_000)


def test_tables_are_deduplicated_and_ids_are_consistent():
    p = parse(example().build())
    s = p.string_table
    assert s[0] == "" and len(set(s)) == len(s)
    assert [m.id for m in p.mapping] and sorted(m.id for m in p.mapping) == \
        list(range(1, len(p.mapping) + 1))
    assert [s[m.filename] for m in p.mapping] == ["/usr/bin/app", "/lib/libc.so.6",
                                                  "[kernel.kallsyms]"]
    assert len({(l.mapping_id, l.address) for l in p.location}) == len(p.location) == 7
    assert len({(f.name, f.filename) for f in p.function}) == len(p.function) == 4
    assert sorted(l.id for l in p.location) == list(range(1, 8))
    assert sorted(f.id for f in p.function) == list(range(1, 5))
    # "main" at two addresses: two locations, one function.
    names = Counter(s[p.function[l.line[0].function_id - 1].name] for l in p.location if l.line)
    assert names["main"] == 2


def test_mappings_carry_ranges_build_ids_and_flags():
    p = parse(example().build())
    s = p.string_table
    by_name = {s[m.filename]: m for m in p.mapping}
    exe, libc, kernel = by_name["/usr/bin/app"], by_name["/lib/libc.so.6"], \
        by_name["[kernel.kallsyms]"]
    assert (exe.memory_start, exe.memory_limit, exe.file_offset, s[exe.build_id]) == \
        (EXE.start, EXE.limit, EXE.offset, EXE.build_id)
    assert exe.has_functions and exe.has_filenames and exe.has_line_numbers
    assert not libc.has_functions and s[libc.build_id] == LIBC.build_id
    assert kernel.has_functions
    assert kernel.memory_start <= SYSCALL[0] and ENTRY[0] < kernel.memory_limit
    assert kernel.memory_start % 4096 == 0 and kernel.memory_limit % 4096 == 0


def test_locations_keep_addresses_and_unknown_frames_have_no_line():
    p = parse(example().build())
    by_address = {l.address: l for l in p.location}
    mapping_ids = {p.string_table[m.filename]: m.id for m in p.mapping}
    unknown = by_address[LIBC_UNKNOWN[1]]
    assert unknown.mapping_id == mapping_ids["/lib/libc.so.6"] and not unknown.line
    unmapped = by_address[UNMAPPED[1]]
    assert unmapped.mapping_id == 0 and not unmapped.line
    leaf = by_address[LEAF[1]]
    assert leaf.mapping_id == mapping_ids["/usr/bin/app"] and leaf.line[0].line == 12
    assert by_address[SYSCALL[0]].mapping_id == mapping_ids["[kernel.kallsyms]"]


def test_identical_samples_merge_and_labels_are_typed():
    p = parse(example().build())
    s = p.string_table
    addresses = {l.id: l.address for l in p.location}
    samples = {}
    for sample in p.sample:
        labels = {s[l.key]: (s[l.str] if l.str else l.num) for l in sample.label}
        stack = tuple(addresses[i] for i in sample.location_id)
        samples[(stack, labels["thread"] if "thread" in labels else None)] = \
            (list(sample.value), labels)
        for label in sample.label:
            assert bool(label.str) != bool(label.num)  # exactly one of str / num is set
    assert len(p.sample) == 3
    full = (SYSCALL[0], ENTRY[0], LEAF[1], MAIN[1], LIBC_UNKNOWN[1])  # kernel first
    assert samples[(full, 43)] == ([7, 7 * PERIOD], {"pid": 42, "comm": "app", "thread": 43})
    assert samples[((LEAF[1], MAIN_AGAIN[1]), 44)][0] == [2, 2 * PERIOD]
    assert samples[((UNMAPPED[1], MAIN[1]), None)] == ([5, 5 * PERIOD],
                                                       {"pid": 7, "comm": "other"})


def pprof(*args: str, path) -> str:
    require_tool("go")
    env = dict(os.environ, HOME=str(path.parent), PPROF_TMPDIR=str(path.parent))
    done = subprocess.run(["go", "tool", "pprof", "-symbolize=none", *args, str(path)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_go_pprof_raw_shows_mappings_build_ids_and_functions(profile_file):
    out = pprof("-raw", path=profile_file)
    assert "PeriodType: cpu nanoseconds" in out and f"Period: {PERIOD}" in out
    assert "samples/count cpu/nanoseconds" in out
    assert f"7   {7 * PERIOD}" in out and f"5   {5 * PERIOD}" in out
    assert f"/usr/bin/app {EXE.build_id} [FN][FL][LN]" in out
    assert f"/lib/libc.so.6 {LIBC.build_id}" in out
    assert "[kernel.kallsyms]" in out and "do_syscall_64" in out
    assert "leaf /src/app.c:12" in out
    assert "pid:[42]" in out and "comm:[app]" in out


def test_go_pprof_traces_and_top_show_stacks_in_order(profile_file):
    traces = pprof("-traces", path=profile_file)
    expected = ["do_syscall_64", "entry_SYSCALL_64", "leaf", "main", "[libc.so.6]"]
    lines = [line.split()[-1] for line in traces.splitlines() if line.strip()]
    start = lines.index("do_syscall_64")
    assert lines[start:start + 5] == expected
    assert "thread:  43" in traces and "comm:  other" in traces
    top = pprof("-top", path=profile_file)
    assert "Total samples = 140ms" in top
    flat = {line.split()[-1]: line.split()[0] for line in top.splitlines()
            if line.strip().endswith(("do_syscall_64", "leaf", "<unknown>"))}
    assert flat == {"do_syscall_64": "70ms", "leaf": "20ms", "<unknown>": "50ms"}


def test_empty_profile_is_valid(tmp_path):
    p = parse(ProfileBuilder(PERIOD, TIME, 1).build())
    assert len(p.sample) == 0 and len(p.mapping) == 0 and p.string_table[0] == ""


def test_a_recursive_kernel_stack_has_one_location_per_address():
    builder = ProfileBuilder(PERIOD, TIME, 10_000_000_000)
    builder.add_sample([LEAF, LEAF], [SYSCALL, SYSCALL, ENTRY], 1, {})
    p = parse(builder.build())
    assert len(p.location) == 3
    ids = list(p.sample[0].location_id)
    assert ids[0] == ids[1] and ids[3] == ids[4] and len(set(ids)) == 3


def test_samples_by_location_ids_build_what_add_sample_builds():
    reference = ProfileBuilder(PERIOD, TIME, 10_000_000_000)
    by_ids = ProfileBuilder(PERIOD, TIME, 10_000_000_000)
    samples = [([LEAF, MAIN, LIBC_UNKNOWN], [SYSCALL, ENTRY], 3, {"thread": 43}),
               ([UNMAPPED, MAIN_AGAIN, MAIN], [], 2, {"pid": 7, "thread": 44}),
               ([LEAF, MAIN, LIBC_UNKNOWN], [SYSCALL, ENTRY], 4, {"thread": 43})]
    for user, kernel, count, labels in samples:
        reference.add_sample(user, kernel, count, labels)
        kernel_ids = [by_ids.kernel_location(a, name) for a, name in kernel]
        mappings, addresses, frames = zip(*user)
        user_ids = by_ids.user_locations(addresses, mappings, frames)
        by_ids.add_location_ids(tuple(kernel_ids + user_ids), count,
                                tuple(sorted(labels.items())))
    assert by_ids.sample_count == reference.sample_count == 9
    assert by_ids.build() == reference.build()


def test_samples_added_many_at_once_carry_their_own_labels_and_counts(tmp_path):
    """add_many: each sample keeps its location ids, count (and count x period) and labels;
    one label set per distinct values; samples from add_location_ids come out too."""
    builder = ProfileBuilder(PERIOD, TIME, 10_000_000_000)
    kernel = builder.kernel_location(*SYSCALL)
    leaf, main = builder.user_locations([LEAF[1], MAIN[1]], [EXE, EXE], [LEAF[2], MAIN[2]])
    builder.add_location_ids((leaf, main), 1, (("pid", 5), ("thread", 50)))
    builder.add_many(iter([(kernel, leaf, main), (leaf, main), (main,)]), [3, 4, 5],
                     ("pid", "thread"), [(7, 70), (7, 71), (7, 70)])
    assert builder.sample_count == 13
    p = parse(builder.build())
    strings = list(p.string_table)
    got = sorted((tuple(s.location_id), tuple(s.value),
                  tuple(sorted((strings[label.key], label.num) for label in s.label)))
                 for s in p.sample)
    assert got == sorted([
        ((leaf, main), (1, PERIOD), (("pid", 5), ("thread", 50))),
        ((kernel, leaf, main), (3, 3 * PERIOD), (("pid", 7), ("thread", 70))),
        ((leaf, main), (4, 4 * PERIOD), (("pid", 7), ("thread", 71))),
        ((main,), (5, 5 * PERIOD), (("pid", 7), ("thread", 70)))])
    path = tmp_path / "many.pb.gz"
    path.write_bytes(builder.build())
    require_tool("go")
    traces = pprof("-traces", path=path)
    assert traces.count("thread:  70") == 2 and traces.count("thread:  71") == 1, traces
    assert "50ms   main\n" in traces and "40ms   leaf\n" in traces, traces


def test_a_builder_kept_for_the_next_window_carries_only_that_windows_samples(tmp_path):
    """new_window keeps the tables and their encoding; the next profile is that encoding plus
    the new window's samples and time. go tool pprof must read it as one profile: the second
    window's samples only, old and new functions named, its own time."""
    builder = ProfileBuilder(PERIOD, TIME, 10_000_000_000)
    leaf, main = builder.user_locations([LEAF[1], MAIN[1]], [EXE, EXE], [LEAF[2], MAIN[2]])
    builder.add_many(iter([(leaf, main)]), [3], ("thread",), [(43,)])
    first = parse(builder.build())
    builder.new_window(TIME + 10_000_000_000, 10_000_000_000)
    assert builder.sample_count == 0
    tables = builder._tables
    builder.add_many(iter([(leaf, main)]), [2], ("thread",), [(44,)])
    assert builder.build() and builder._tables is tables  # nothing new: the same encoding
    builder.new_window(TIME + 10_000_000_000, 10_000_000_000)
    # A new address: the tables are encoded again, with it.
    (libc,) = builder.user_locations([LIBC_UNKNOWN[1]], [LIBC], [Frame("memcpy")])
    builder.add_many(iter([(leaf, main), (libc, main)]), [2, 5], ("thread",), [(44,), (45,)])
    second = parse(builder.build())
    assert builder._tables is not tables
    assert second.time_nanos == TIME + 10_000_000_000 and first.time_nanos == TIME
    assert sorted(tuple(s.value) for s in second.sample) == [(2, 2 * PERIOD), (5, 5 * PERIOD)]
    path = tmp_path / "second.pb.gz"
    path.write_bytes(builder.build())
    top = pprof("-top", path=path)
    assert "Total samples = 70ms" in top, top
    flat = {line.split()[-1]: line.split()[0] for line in top.splitlines()
            if line.strip().endswith(("leaf", "memcpy"))}
    assert flat == {"leaf": "20ms", "memcpy": "50ms"}, top
    raw = pprof("-raw", path=path)
    assert "thread:[43]" not in raw and "thread:[45]" in raw, raw


def test_a_location_made_without_a_name_is_made_again_once_named():
    """An address whose file could not be read in one window and can in a later one: the
    later profile names it (a new location; the old one stays, unused)."""
    builder = ProfileBuilder(PERIOD, TIME, 10_000_000_000)
    (before,) = builder.user_locations([LEAF[1]], [EXE], [None])
    assert builder.user_locations([LEAF[1]], [EXE], [None]) == [before]  # still nameless
    (after,) = builder.user_locations([LEAF[1]], [EXE], [LEAF[2]])
    assert after != before
    assert builder.user_locations([LEAF[1]], [EXE], [None]) == [after]  # the named one stays
    builder.add_many(iter([(after,)]), [1], ("thread",), [(1,)])
    p = parse(builder.build())
    location = next(loc for loc in p.location if loc.id == after)
    function = next(f for f in p.function if f.id == location.line[0].function_id)
    assert p.string_table[function.name] == "leaf"


def test_small_profiles_are_stored_and_large_ones_deflated_and_go_pprof_reads_both(tmp_path):
    """A small profile's gzip member holds one stored block (no deflate set-up per profile);
    from STORE_BELOW bytes on it is deflated. Both are gzip as pprof's reader takes it."""
    small = example().build()
    raw = gzip.decompress(small)
    assert len(raw) < STORE_BELOW and len(small) == len(raw) + 23
    assert small[10] == 0x01  # BFINAL set, BTYPE 00: a stored block
    big_builder = ProfileBuilder(PERIOD, TIME, 10_000_000_000)
    for i in range(600):
        frame = (EXE, 0x555555554000 + 16 * i, Frame(f"function_{i}", "/src/app.c", i))
        big_builder.add_sample([frame, MAIN], [], 1, {"thread": i})
    big = big_builder.build()
    assert len(gzip.decompress(big)) >= STORE_BELOW and len(big) < len(gzip.decompress(big)) / 2
    for name, blob, total in (("small", small, "140ms"), ("big", big, "6s")):
        path = tmp_path / f"{name}.pb.gz"
        path.write_bytes(blob)
        assert f"Total samples = {total}" in pprof("-top", path=path), name


@pytest.mark.parametrize("size", [0, 1, 1000, STORE_BELOW - 1, STORE_BELOW, 70_000])
def test_gzip_bytes_round_trips_at_the_bounds(size):
    data = (os.urandom(size // 2) + bytes(size - size // 2))
    blob = gzip_bytes(data)
    assert gzip.decompress(blob) == data
    assert (blob[10] == 0x01) == (size < STORE_BELOW)


def test_tables_grown_over_windows_read_back_as_tables_built_at_once():
    """The kept encoding grows by each window's new locations, functions and strings, and its
    mappings are encoded again when their flags or the kernel range change: read back, the
    tables are those of one builder given everything in one window."""
    frames = [(EXE, 0x555555554100, None), (EXE, 0x555555554300, Frame("late", "/src/b.c", 5)),
              (LIBC, 0x7F0000000600, Frame("memcpy")), (None, 0x99, None)]
    kernel = [(0xFFFFFFFF81000100, "do_syscall_64"), (0xFFFFFFFF8100F000, "vfs_read")]
    kept = ProfileBuilder(PERIOD, TIME, 10_000_000_000)
    at_once = ProfileBuilder(PERIOD, TIME, 10_000_000_000)
    for window, (frame, k) in enumerate(zip(frames, kernel + [None, None])):
        kept.new_window(TIME + window, 1)
        user = kept.user_locations([frame[1]], [frame[0]], [frame[2]])
        ids = tuple(user) + ((kept.kernel_location(*k),) if k else ())
        kept.add_many(iter([ids]), [1], ("thread",), [(window,)])
        grown = parse(kept.build())
        at_once.user_locations([frame[1]], [frame[0]], [frame[2]])
        if k:
            at_once.kernel_location(*k)
        fresh = parse(at_once.build())

        def tables(p):
            strings = list(p.string_table)
            return ([(m.memory_start, m.memory_limit, strings[m.filename], m.has_functions)
                     for m in p.mapping],
                    sorted((loc.id, loc.mapping_id, loc.address,
                            tuple((strings[p.function[ln.function_id - 1].name], ln.line)
                                  for ln in loc.line)) for loc in p.location))
        assert tables(grown) == tables(fresh), window
        assert len(grown.string_table) == len(set(grown.string_table))  # none twice
        assert len(grown.sample) == 1 and grown.time_nanos == TIME + window
