"""Windows and targets in the aggregator: edges, grouping, filtering, sampling, pprof output."""

from __future__ import annotations

import gzip

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import services.proto_gen  # noqa: F401
from pprof import profile_pb2

from services.aggregator.profile_builder import Frame, MappingInfo, ProfileBuilder
from services.aggregator.symbols import Symbolizer
from services.aggregator.windows import GRACE_NS, WindowAggregator

SECOND = 1_000_000_000
BASE = 1_700_000_000 * SECOND  # a multiple of 10 s


def batch(time_ns, records, stacks=None, kernel=None, duration_ns=0):
    """A samples body; by default one covering only the instant time_ns (a batch is placed by
    the middle of what it covers), so time_ns says which window it is in."""
    return {"time_ns": time_ns, "duration_ns": duration_ns, "frequency": 100, "records": records,
            "stacks": stacks or [[0x1000, 0x2000]], "kernel_symbols": kernel or {},
            "errors": {}}


def process(pid, comm="work"):
    return {"pid": pid, "start_time": 1, "comm": comm, "executable": f"/bin/{comm}",
            "cmdline": [], "mappings": []}


def make(**kw):
    return WindowAggregator("node-a", 10, 100, Symbolizer(), clock=lambda: BASE, **kw)


def decode(profile):
    p = profile_pb2.Profile()
    p.ParseFromString(gzip.decompress(profile["pprof"]))
    return p


def test_batches_around_a_window_edge_land_in_exactly_one_window_each():
    """A batch covers the second before its drain: the one drained at the window's end (a
    few ms late, as drains are) holds samples of the window that ends, and counts there."""
    agg = make()
    agg.add_process(process(7))
    times = [BASE + 8 * SECOND, BASE + 9 * SECOND + SECOND - 1, BASE + 10 * SECOND + 3_000_000,
             BASE + 11 * SECOND, BASE + 11 * SECOND + SECOND // 2 - 1]
    for t, count in zip(times, [5, 5, 5, 7, 11]):
        agg.add_samples(batch(t, [[7, 7, 1, 0, -1, count]], duration_ns=SECOND))
    assert agg.close_due(BASE + 10 * SECOND + GRACE_NS - 1) == []  # still inside the grace
    first = agg.close_due(BASE + 10 * SECOND + GRACE_NS)
    assert [p["samples"] for p in first] == [5 + 5 + 5]
    assert (first[0]["start_ns"], first[0]["end_ns"]) == (BASE, BASE + 10 * SECOND)
    second = agg.close_due(BASE + 20 * SECOND + GRACE_NS)
    assert [p["samples"] for p in second] == [7 + 11]
    assert agg.close_due(BASE + 100 * SECOND) == []  # nothing twice


def test_a_batch_is_placed_by_the_middle_of_what_it_covers_within_half_a_window():
    """duration_ns moves a batch back by half of it, but a sender cannot move it further than
    half a window (a negative or huge duration), nor anywhere when it is not a number."""
    agg = make()
    agg.add_process(process(7))
    for duration, count in [(4 * SECOND, 1), (-5 * SECOND, 2), (10**15, 4)]:
        agg.add_samples(dict(batch(BASE + 11 * SECOND, [[7, 7, 1, 0, -1, count]]),
                             duration_ns=duration))
    for bad in ("x", None, float("inf"), [1]):
        with pytest.raises((TypeError, ValueError)):
            agg.add_samples(dict(batch(BASE + 11 * SECOND, [[7, 7, 1, 0, -1, 100]]),
                                 duration_ns=bad))
    # 11 s - 2 s = 9 s and 11 s - 5 s = 6 s: the window before; 11 s - 0: this one.
    assert [p["samples"] for p in agg.close_due(BASE + 10 * SECOND + GRACE_NS)] == [1 + 4]
    assert [p["samples"] for p in agg.close_due(BASE + 20 * SECOND + GRACE_NS)] == [2]


def test_next_close_is_when_close_due_first_builds_something():
    """The service sleeps until next_close_ns: one ns earlier nothing closes, at it one does."""
    agg = make()
    assert agg.next_close_ns() is None
    agg.add_samples(batch(BASE + 3 * SECOND, [[7, 7, 1, 0, -1, 1]]))
    agg.add_samples(batch(BASE + 13 * SECOND, [[7, 7, 1, 0, -1, 1]]))
    due = agg.next_close_ns()
    assert due == BASE + 10 * SECOND + GRACE_NS
    assert agg.close_due(due - 1) == [] and len(agg.close_due(due)) == 1
    assert agg.next_close_ns() == BASE + 20 * SECOND + GRACE_NS


def test_a_late_batch_goes_to_the_open_window_not_lost_not_twice():
    agg = make()
    agg.add_samples(batch(BASE + SECOND, [[7, 7, 1, 0, -1, 3]]))
    assert sum(p["samples"] for p in agg.close_due(BASE + 12 * SECOND)) == 3
    agg.add_samples(batch(BASE + 9 * SECOND, [[7, 7, 1, 0, -1, 4]]))  # its window is gone
    later = agg.close_due(BASE + 22 * SECOND)
    assert sum(p["samples"] for p in later) == 4
    assert later[0]["start_ns"] == BASE + 10 * SECOND


def test_per_process_targets_on_a_plain_host():
    agg = make()
    agg.add_process(process(7, "alpha"))
    agg.add_process(process(8, "<img src=x>"))
    agg.add_samples(batch(BASE, [[7, 7, 1, 0, -1, 2], [8, 9, 1, 0, -1, 3]]))
    profiles = {p["labels"]["pid"]: p for p in agg.close_due(BASE + 20 * SECOND)}
    assert profiles["7"]["labels"] == {"node": "node-a", "pid": "7", "comm": "alpha",
                                       "executable": "/bin/alpha"}
    assert profiles["8"]["labels"]["comm"] == "<img src=x>"
    p = decode(profiles["8"])
    strings = p.string_table
    thread = [lab.num for s in p.sample for lab in s.label if strings[lab.key] == "thread"]
    assert thread == [9]
    assert [strings[t.type] for t in p.sample_type] == ["samples", "cpu"]
    assert p.period == 10_000_000 and p.duration_nanos == 10 * SECOND and p.time_nanos == BASE
    assert list(p.sample[0].value) == [3, 30_000_000]


def test_discovery_targets_group_by_cgroup_or_pid_and_filtering_drops_the_rest():
    agg = make()
    agg.apply_targets({"filtering": True, "targets": [
        {"labels": {"node": "n", "systemd_unit": "a.service"}, "cgroup_ids": [55], "pids": []},
        {"labels": {"node": "n", "pod": "p", "container": "c"}, "cgroup_ids": [], "pids": [9]}]})
    agg.add_samples(batch(BASE, [[1, 1, 55, 0, -1, 2], [2, 2, 55, 0, -1, 3],
                                 [9, 9, 66, 0, -1, 4], [3, 3, 77, 0, -1, 100]]))
    profiles = {p["labels"].get("systemd_unit") or p["labels"]["pod"]: p
                for p in agg.close_due(BASE + 20 * SECOND)}
    assert set(profiles) == {"a.service", "p"}
    assert profiles["a.service"]["samples"] == 5 and profiles["p"]["samples"] == 4
    p = decode(profiles["a.service"])
    pids = sorted(lab.num for s in p.sample for lab in s.label if p.string_table[lab.key] == "pid")
    assert pids == [1, 2]


def test_without_filtering_unlisted_processes_still_get_their_own_targets():
    agg = make()
    agg.apply_targets({"filtering": False, "targets": [
        {"labels": {"node": "n", "systemd_unit": "a.service"}, "cgroup_ids": [55], "pids": []}]})
    agg.add_samples(batch(BASE, [[1, 1, 55, 0, -1, 2], [3, 3, 77, 0, -1, 1]]))
    labels = [p["labels"] for p in agg.close_due(BASE + 20 * SECOND)]
    assert {"node": "n", "systemd_unit": "a.service"} in labels
    assert any(lab.get("pid") == "3" for lab in labels)


def test_sampling_ratio_zero_builds_no_per_process_profile():
    agg = make(sampling_ratio=0.0)
    agg.add_samples(batch(BASE, [[1, 1, 55, 0, -1, 2]]))
    assert agg.close_due(BASE + 20 * SECOND) == []


def test_kernel_frames_carry_the_collectors_names():
    agg = make()
    stacks = [[0x1000], [0xffffffff81000010, 0xffffffff81000020]]
    agg.add_samples(batch(BASE, [[7, 7, 1, 0, 1, 1]], stacks,
                          {0xffffffff81000010: "clear_page_erms",
                           0xffffffff81000020: "do_syscall_64"}))
    p = decode(agg.close_due(BASE + 20 * SECOND)[0])
    names = {p.string_table[f.name] for f in p.function}
    assert {"clear_page_erms", "do_syscall_64"} <= names
    assert "[kernel.kallsyms]" in {p.string_table[m.filename] for m in p.mapping}


def test_a_bad_batch_changes_nothing_and_a_far_future_stamp_opens_no_window():
    agg = make()
    agg.add_samples(batch(BASE, [[7, 7, 1, 0, -1, 2]]))
    for bad in ([[7, 7, 1, 5, -1, 2]], [[7, 7, 1, 0, -1, "x"]], [[7, 7, 1, 0, -1, 0]],
                [[7, 7, 1]]):
        try:
            agg.add_samples(batch(BASE, [[7, 7, 1, 0, -1, 9]] + bad))
        except (ValueError, TypeError, IndexError):
            pass
    try:
        agg.add_samples(batch(BASE, [[7, 7, 1, 0, -1, 9]], stacks=[[-5]]))
    except ValueError:
        pass
    agg.add_samples(batch(BASE + 10**6 * SECOND, [[7, 7, 1, 0, -1, 1]]))
    assert list(agg.windows) == [BASE]
    assert [p["samples"] for p in agg.close_due(BASE + 20 * SECOND)] == [3]


KERNEL = 0xFFFFFFFF81000010


@pytest.mark.parametrize("bad", [
    {"stacks": [[0x1000, 4096.5]]},  # a float address
    {"stacks": [[0x1000, float(0x2000)]]},  # a float equal to a stack already counted
    {"stacks": [b"\x00\x10\x00\x00\x00\x00\x00\x00"]},  # bytes: no raw memory
    {"stacks": ["ab"]},
    {"stacks": [[0x1000, None]]},
    {"stacks": [[1 << 64]]},
    {"stacks": [[-1]]},
    {"stacks": {"0": [0x1000]}},
    {"records": [[7, 7, 1, 0, -1, -3]]},  # a negative count
    {"records": [[7, 7, 1, 0, -1, 1 << 32]]},
    {"records": [[7, 7, 1, 0, -1]]},  # 5 fields
    {"records": [[7, 7, 1, 0, -1, 1, 1]]},  # 7 fields
    {"records": [[7, 7, 1, 0, -2, 1]]},
    {"records": [[7, 7, 1, 1, -1, 1]]},  # past the last stack
    {"records": [[-7, 7, 1, 0, -1, 1]]},
    {"records": [[7, 7, 1 << 64, 0, -1, 1]]},
    {"records": [[7, 7, 1, 0.0, -1, 1]]},
    {"records": [[7, 7, 1, 0, -1, 1.0]]},
    {"records": ["771011"]},  # six characters
    {"records": [b"\x07\x07\x01\x00\x00\x01"]},  # six bytes
    {"records": [{1: 1, 2: 2, 3: 3, 4: 4, 5: 5, 6: 6}]},
    {"kernel_symbols": {1 << 64: "x"}},
    {"kernel_symbols": {1.5: "x"}},
    {"kernel_symbols": [[KERNEL, "x"]]},
    {"time_ns": float("inf")},
    {"time_ns": float("nan")},
])
def test_a_bad_batch_raises_type_or_value_error_and_counts_nothing(bad):
    agg = make()
    agg.add_samples(batch(BASE, [[7, 7, 1, 0, -1, 2]], kernel={KERNEL: "before"}))
    body = batch(BASE, [[7, 7, 1, 0, -1, 9], [8, 8, 1, 0, -1, 9]],
                 kernel={KERNEL: "after", KERNEL + 16: "new"})
    body.update(bad)
    # Not OverflowError: the service drops a message for TypeError or ValueError only.
    with pytest.raises((TypeError, ValueError)):
        agg.add_samples(body)
    assert dict(agg.kernel_names) == {KERNEL: "before"}
    assert list(agg.windows) == [BASE]
    assert [p["samples"] for p in agg.close_due(BASE + 20 * SECOND)] == [2]


def test_out_of_range_process_and_target_numbers_raise_value_error():
    agg = make()
    bad_process = dict(process(7), mappings=[{"start": float("inf"), "limit": 1, "offset": 0,
                                             "path": "/bin/x"}])
    with pytest.raises(ValueError):
        agg.add_process(bad_process)
    exe = {"start": 0x1000, "limit": 0x2000, "offset": 0, "path": "/bin/x"}
    for bad in (dict(exe, start=-1), dict(exe, limit=1 << 64), dict(exe, offset=-4096)):
        with pytest.raises(ValueError):  # kept tables would fail every later profile
            agg.add_process(dict(process(7), mappings=[bad]))
    with pytest.raises(ValueError):
        agg.apply_targets({"filtering": True, "targets": [
            {"labels": {"a": "b"}, "cgroup_ids": [float("inf")], "pids": []}]})
    assert agg.processes == {} and not agg.filtering and agg.by_cgroup == {}


def test_equal_stacks_from_different_batches_make_one_sample():
    agg = make()
    first = [[0x1000, 0x2000], [KERNEL]]
    second = [[KERNEL], [0x3000], [0x1000, 0x2000]]  # the same stacks, other indexes
    agg.add_samples(batch(BASE, [[7, 7, 1, 0, 1, 2], [7, 7, 1, 0, -1, 1]], first,
                          {KERNEL: "k"}))
    agg.add_samples(batch(BASE + SECOND, [[7, 7, 1, 2, 0, 3], [7, 7, 1, 2, -1, 1],
                                          [7, 8, 1, 2, -1, 1]], second))
    p = decode(agg.close_due(BASE + 20 * SECOND)[0])
    addresses = {loc.id: loc.address for loc in p.location}
    thread = list(p.string_table).index("thread")
    got = sorted((tuple(addresses[i] for i in s.location_id),
                  [lab.num for lab in s.label if lab.key == thread], s.value[0])
                 for s in p.sample)
    assert got == [((0x1000, 0x2000), [7], 2), ((0x1000, 0x2000), [8], 1),
                   ((KERNEL, 0x1000, 0x2000), [7], 5)]


def test_a_repeated_address_in_a_stack_is_one_location():
    agg = make()
    agg.add_samples(batch(BASE, [[7, 7, 1, 0, 1, 1]], [[0x1000, 0x2000, 0x2000, 0x2000],
                                                      [KERNEL, KERNEL]], {KERNEL: "recurse"}))
    p = decode(agg.close_due(BASE + 20 * SECOND)[0])
    ids = list(p.sample[0].location_id)
    assert len(ids) == 6 and len(p.location) == 3
    assert ids[0] == ids[1] and ids[3] == ids[4] == ids[5]


class NamingSymbolizer(Symbolizer):
    """Names every address it is asked about fn_<hex>, and remembers what it was asked."""

    def __init__(self):
        super().__init__()
        self.asked = []

    def frames(self, mapping, candidates, addresses):
        self.asked.append((mapping.path, candidates, list(addresses)))
        return [Frame(f"fn_{a:x}") for a in addresses]


def test_profiles_are_those_of_adding_each_sample_in_turn():
    """The window interns stacks and works out each address once; the profile must be the
    one ProfileBuilder.add_sample makes from the samples one by one, byte for byte."""
    symbolizer = NamingSymbolizer()
    agg = WindowAggregator("node-a", 10, 100, symbolizer, clock=lambda: BASE)
    exe = {"start": 0x1000, "limit": 0x5000, "offset": 0, "path": "/bin/work", "build_id": "ab",
           "cache_path": "/cache/work"}
    vdso = {"start": 0x5000, "limit": 0x6000, "offset": 0, "path": "[vdso]"}
    for pid in (7, 8):
        agg.add_process(dict(process(pid), mappings=[exe, vdso]))
    stacks = [[0x1100, 0x1200, 0x5100, 0x9000], [0x1200, 0x1300], [KERNEL, KERNEL + 32],
              [0x1300, 0x1300, 0x1400]]
    records = [[7, 70, 1, 0, 2, 3], [7, 71, 1, 1, -1, 1], [8, 80, 1, 1, 2, 2],
               [7, 70, 1, 3, -1, 1], [9, 90, 1, 1, -1, 4], [7, 70, 1, 0, 2, 1]]
    agg.add_samples(batch(BASE, records, stacks, {KERNEL: "k_entry"}))
    profiles = {p["labels"]["pid"]: p for p in agg.close_due(BASE + 20 * SECOND)}

    # 0x1200 and 0x1300 are innermost somewhere and callers elsewhere: looked up as callers.
    assert sorted(symbolizer.asked[0][2]) == [0x1100, 0x11FF, 0x12FF, 0x13FF]
    assert symbolizer.asked[0][:2] == ("/bin/work", ["/cache/work", "/bin/work"])
    exe_info = MappingInfo(0x1000, 0x5000, 0, "/bin/work", "ab")
    vdso_info = MappingInfo(0x5000, 0x6000, 0, "[vdso]", "")

    def user(pid, stack):
        if pid == 9:  # no process message: no mapping
            return [(None, a, None) for a in stack]
        lookup = {0x1100: 0x1100, 0x1200: 0x11FF, 0x1300: 0x12FF, 0x1400: 0x13FF}
        if pid == 8:  # each target on its own: 0x1200 is only innermost there
            lookup[0x1200] = 0x1200
        return [(exe_info, a, Frame(f"fn_{lookup[a]:x}")) if a < 0x5000 else
                (vdso_info, a, None) if a < 0x6000 else (None, a, None) for a in stack]

    kernel = [(KERNEL, "k_entry"), (KERNEL + 32, "[unknown]")]
    for pid, samples in {"7": [([70], 0, kernel, 4), ([71], 1, [], 1), ([70], 3, [], 1)],
                         "8": [([80], 1, kernel, 2)], "9": [([90], 1, [], 4)]}.items():
        expected = ProfileBuilder(10_000_000, BASE, 10 * SECOND)
        for (tid,), u, k, count in samples:
            expected.add_sample(user(int(pid), stacks[u]), k, count, {"thread": tid})
        assert profiles[pid]["pprof"] == expected.build(), pid
        assert profiles[pid]["samples"] == expected.sample_count


def test_a_memfd_mapping_is_named_from_the_collectors_copy_only():
    """/proc/<pid>/maps shows memfd_create() code as "/memfd:name (deleted)", which is no file:
    never opened as a path (a failed open and a warning every window); the collector's copy
    by build id, when there is one, is."""
    symbolizer = NamingSymbolizer()
    agg = WindowAggregator("node-a", 10, 100, symbolizer, clock=lambda: BASE)
    jit = {"start": 0x1000, "limit": 0x2000, "offset": 0, "path": "/memfd:jit (deleted)",
           "build_id": "", "cache_path": ""}
    copied = {"start": 0x2000, "limit": 0x3000, "offset": 0, "path": "/memfd:lib (deleted)",
              "build_id": "ef", "cache_path": "/cache/ef"}
    agg.add_process(dict(process(7), mappings=[jit, copied]))
    agg.add_samples(batch(BASE, [[7, 7, 1, 0, -1, 1]], [[0x1100, 0x2100]]))
    (profile,) = agg.close_due(BASE + 20 * SECOND)
    assert [(path, candidates) for path, candidates, _ in symbolizer.asked] == \
        [("/memfd:lib (deleted)", ["/cache/ef"])]
    p = decode(profile)
    assert len(p.sample) == 1 and len(p.sample[0].location_id) == 2


def test_processes_with_one_layout_share_the_work_but_not_their_names_elsewhere():
    """Forked workers (equal mappings and cache paths) of one target: each address is looked
    up once for all of them. A process whose file is read from another cache path (another
    container's copy) is looked up on its own, and its frames carry its own names."""
    symbolizer = NamingSymbolizer()
    agg = WindowAggregator("node-a", 10, 100, symbolizer, clock=lambda: BASE)
    agg.apply_targets({"filtering": False, "targets": [
        {"labels": {"container": "c"}, "cgroup_ids": [5], "pids": []}]})
    exe = {"start": 0x1000, "limit": 0x5000, "offset": 0, "path": "/bin/work", "build_id": "",
           "cache_path": "/cache/a/work"}
    for pid in (7, 8):
        agg.add_process(dict(process(pid), mappings=[exe]))
    agg.add_process(dict(process(9), mappings=[dict(exe, cache_path="/cache/b/work")]))
    stacks = [[0x1100, 0x1200], [0x1100, 0x1300]]
    records = [[7, 7, 5, 0, -1, 1], [8, 8, 5, 1, -1, 2], [9, 9, 5, 0, -1, 3]]
    agg.add_samples(batch(BASE, records, stacks))
    (profile,) = agg.close_due(BASE + 20 * SECOND)
    asked = sorted((candidates[0], sorted(addresses))
                   for _path, candidates, addresses in symbolizer.asked)
    assert asked == [("/cache/a/work", [0x1100, 0x11FF, 0x12FF]),
                     ("/cache/b/work", [0x1100, 0x11FF])]
    p = decode(profile)
    strings = list(p.string_table)
    names = {f.id: strings[f.name] for f in p.function}
    frames = {loc.id: (loc.address, names[loc.line[0].function_id]) for loc in p.location}
    pid_key = strings.index("pid")
    got = sorted(([lab.num for lab in s.label if lab.key == pid_key][0],
                  [frames[i] for i in s.location_id], s.value[0]) for s in p.sample)
    assert got == [(7, [(0x1100, "fn_1100"), (0x1200, "fn_11ff")], 1),
                   (8, [(0x1100, "fn_1100"), (0x1300, "fn_12ff")], 2),
                   (9, [(0x1100, "fn_1100"), (0x1200, "fn_11ff")], 3)]


def test_a_repeated_process_message_is_taken_once_and_a_changed_one_again():
    agg = make()
    exe = {"start": 0x1000, "limit": 0x5000, "offset": 0, "path": "/bin/work", "build_id": ""}
    agg.add_process(dict(process(7), mappings=[exe]))
    first = agg.processes[7]
    agg.add_process(dict(process(7), mappings=[dict(exe)]))  # the collector's repeat
    assert agg.processes[7] is first
    agg.add_process(dict(process(7, comm="renamed"), mappings=[exe]))
    assert agg.processes[7].comm == "renamed"
    agg.add_process(dict(process(7, comm="renamed"),
                         mappings=[exe, dict(exe, start=0x6000, limit=0x7000)]))  # dlopen
    assert [m.start for m in agg.processes[7].mappings] == [0x1000, 0x6000]
    agg.add_process(dict(process(7, comm="again"), pid=7.0,
                         mappings=[exe, dict(exe, start=0x6000, limit=0x7000)]))
    assert agg.processes[7].comm == "again"  # changed, so made again: from a float pid
    assert type(agg.processes[7].pid) is int


def _named_samples(profile) -> list[tuple[list[str], int]]:
    p = decode(profile)
    strings = list(p.string_table)
    names = {f.id: strings[f.name] for f in p.function}
    frames = {loc.id: names[loc.line[0].function_id] if loc.line else hex(loc.address)
              for loc in p.location}
    return sorted(([frames[i] for i in s.location_id], s.value[0]) for s in p.sample)


def test_a_targets_next_window_symbolizes_only_its_new_addresses():
    """The target's builder is kept: a later window looks up only addresses the target has
    not shown before, and its profile still names every frame and counts only its samples."""
    symbolizer = NamingSymbolizer()
    agg = WindowAggregator("node-a", 10, 100, symbolizer, clock=lambda: BASE)
    exe = {"start": 0x1000, "limit": 0x5000, "offset": 0, "path": "/bin/work", "build_id": ""}
    agg.add_process(dict(process(7), mappings=[exe]))
    agg.add_samples(batch(BASE, [[7, 7, 1, 0, -1, 3]], [[0x1100, 0x1200]]))
    (first,) = agg.close_due(BASE + 20 * SECOND)
    assert [sorted(a) for _, _, a in symbolizer.asked] == [[0x1100, 0x11FF]]
    agg.add_samples(batch(BASE + 10 * SECOND, [[7, 7, 1, 0, -1, 2], [7, 7, 1, 1, -1, 4]],
                          [[0x1100, 0x1200], [0x1300, 0x1200]]))
    (second,) = agg.close_due(BASE + 30 * SECOND)
    assert [sorted(a) for _, _, a in symbolizer.asked] == [[0x1100, 0x11FF], [0x1300]]
    assert _named_samples(first) == [(["fn_1100", "fn_11ff"], 3)]
    assert _named_samples(second) == [(["fn_1100", "fn_11ff"], 2), (["fn_1300", "fn_11ff"], 4)]
    assert decode(second).time_nanos == BASE + 10 * SECOND


class LateSymbolizer(Symbolizer):
    """Names nothing until ``ready``, then every address fn_<hex>."""

    def __init__(self):
        super().__init__()
        self.ready = False

    def frames(self, mapping, candidates, addresses):
        return [Frame(f"fn_{a:x}") if self.ready else None for a in addresses]


def _one_stack_in_two_windows(symbolizer, path, between):
    """pid 7, mapping `path`, sampled at 0x1100 in two windows; between(agg, exe) runs
    between them. The two profiles."""
    agg = WindowAggregator("node-a", 10, 100, symbolizer, clock=lambda: BASE)
    exe = {"start": 0x1000, "limit": 0x5000, "offset": 0, "path": path, "build_id": ""}
    agg.add_process(dict(process(7), mappings=[exe]))
    profiles = []
    for i in range(2):
        if i:
            between(agg, exe)
        agg.add_samples(batch(BASE + i * 10 * SECOND, [[7, 7, 1, 0, -1, 1]], [[0x1100]]))
        (profile,) = agg.close_due(BASE + (i + 2) * 10 * SECOND)
        profiles.append(profile)
    return profiles


def test_an_address_named_in_a_later_window_is_named_in_its_profile():
    """A file unreadable in one window (not yet in the binary cache) and readable in the next:
    the target's kept state must not hold on to the nameless frame."""
    symbolizer = LateSymbolizer()
    first, second = _one_stack_in_two_windows(
        symbolizer, "/bin/work", lambda agg, exe: setattr(symbolizer, "ready", True))
    assert _named_samples(first) == [(["0x1100"], 1)]
    assert _named_samples(second) == [(["fn_1100"], 1)]


class PathSymbolizer(Symbolizer):
    def __init__(self):
        super().__init__()
        self.asked = []

    def frames(self, mapping, candidates, addresses):
        self.asked.append(mapping.path)
        return [Frame(f"{mapping.path}:{a:x}") for a in addresses]


def test_a_reused_pid_is_named_from_its_new_files_not_the_kept_state():
    """Same pid, same target key, same addresses, another program: its frames come from its
    own mappings, not from what the target's kept state learned of the old process."""
    symbolizer = PathSymbolizer()
    first, second = _one_stack_in_two_windows(
        symbolizer, "/bin/old", lambda agg, exe: agg.add_process(
            dict(process(7), start_time=2, mappings=[dict(exe, path="/bin/new")])))
    assert _named_samples(first) == [(["/bin/old:1100"], 1)]
    assert _named_samples(second) == [(["/bin/new:1100"], 1)]
    assert symbolizer.asked == ["/bin/old", "/bin/new"]
    # Started afresh: the old program's mapping is not in the new one's profile.
    strings = decode(second).string_table
    assert [strings[m.filename] for m in decode(second).mapping] == ["/bin/new"]


def test_kept_states_are_dropped_when_idle_and_renewed_in_time(monkeypatch):
    """A target without samples for STATE_IDLE_WINDOWS windows loses its state; a state older
    than STATE_RENEW_WINDOWS windows starts afresh, and with it the profile stops carrying
    locations of code the target no longer runs."""
    from services.aggregator import windows
    monkeypatch.setattr(windows, "STATE_RENEW_WINDOWS", 2)
    agg = make()
    stacks = [[0x1100], [0x1200]]
    # pid 7 every window; pid 8 in the first only.
    agg.add_samples(batch(BASE, [[7, 7, 1, 0, -1, 1], [8, 8, 1, 0, -1, 1]], stacks))
    agg.close_due(BASE + 20 * SECOND)
    assert set(agg.states) == {("process", 7), ("process", 8)}
    for i in (1, 2):
        agg.add_samples(batch(BASE + i * 10 * SECOND, [[7, 7, 1, 1, -1, 1]], stacks))
        (profile,) = agg.close_due(BASE + (i + 2) * 10 * SECOND)
        addresses = sorted(loc.address for loc in decode(profile).location)
        # Window 2 (i=1) carries window 1's address too; window 3 starts afresh.
        assert addresses == ([0x1100, 0x1200] if i == 1 else [0x1200]), i
    for i in range(3, 3 + windows.STATE_IDLE_WINDOWS):
        # pid 8 was last seen in window 0: kept until STATE_IDLE_WINDOWS windows without it closed.
        assert (("process", 8) in agg.states) == (i <= windows.STATE_IDLE_WINDOWS), i
        agg.add_samples(batch(BASE + i * 10 * SECOND, [[7, 7, 1, 0, -1, 1]], stacks))
        agg.close_due(BASE + (i + 2) * 10 * SECOND)
    assert set(agg.states) == {("process", 7)}
    assert agg.kept_locations == agg.states[("process", 7)].builder.location_count


def test_kept_locations_are_bounded_least_recently_used_first(monkeypatch):
    from services.aggregator import windows
    monkeypatch.setattr(windows, "MAX_KEPT_LOCATIONS", 5)
    agg = make()
    # Three targets of two locations each, built in the order 7, 8, 9.
    agg.add_samples(batch(BASE, [[pid, pid, 1, 0, -1, 1] for pid in (7, 8, 9)],
                          [[0x1100, 0x1200]]))
    assert len(agg.close_due(BASE + 20 * SECOND)) == 3
    assert list(agg.states) == [("process", 8), ("process", 9)]
    assert agg.kept_locations == 4


def test_a_failed_build_starts_the_target_afresh(monkeypatch):
    """Whatever made a build fail may sit in the kept tables: the state is dropped, so the
    next window builds again instead of failing for the state's whole life."""
    agg = make()
    # An address in the kernel's top page: the mapping's end must stay within uint64.
    agg.add_samples(batch(BASE, [[7, 7, 1, -1, 0, 1]], [[0xFFFFFFFFFFFFFFF0]]))
    (top,) = agg.close_due(BASE + 20 * SECOND)
    assert decode(top).mapping[0].memory_limit == (1 << 64) - 1
    from services.aggregator import profile_builder
    real = profile_builder.ProfileBuilder.build
    calls = []

    def fail_once(self):
        calls.append(self)
        if len(calls) == 1:
            raise ValueError("boom")
        return real(self)
    monkeypatch.setattr(profile_builder.ProfileBuilder, "build", fail_once)
    agg.add_samples(batch(BASE + 10 * SECOND, [[7, 7, 1, 0, -1, 1]], [[0x1100]]))
    assert agg.close_due(BASE + 30 * SECOND) == []
    assert ("process", 7) not in agg.states
    agg.add_samples(batch(BASE + 20 * SECOND, [[7, 7, 1, 0, -1, 1]], [[0x1100]]))
    assert len(agg.close_due(BASE + 40 * SECOND)) == 1
    assert calls[1] is not calls[0]  # a new builder


def test_a_known_leaf_does_not_change_how_a_new_caller_is_looked_up():
    """A stack with a leaf the target knows and a caller it does not: only the caller is
    looked up, as a caller (return address - 1), whatever the known leaf is."""
    symbolizer = NamingSymbolizer()
    agg = WindowAggregator("node-a", 10, 100, symbolizer, clock=lambda: BASE)
    exe = {"start": 0x1000, "limit": 0x5000, "offset": 0, "path": "/bin/work", "build_id": ""}
    agg.add_process(dict(process(7), mappings=[exe]))
    agg.add_samples(batch(BASE, [[7, 7, 1, 0, -1, 1]], [[0x1100]]))
    agg.close_due(BASE + 20 * SECOND)
    agg.add_samples(batch(BASE + 10 * SECOND, [[7, 7, 1, 0, -1, 1]], [[0x1100, 0x1400]]))
    (second,) = agg.close_due(BASE + 30 * SECOND)
    assert [sorted(a) for _, _, a in symbolizer.asked] == [[0x1100], [0x13FF]]
    assert _named_samples(second) == [(["fn_1100", "fn_13ff"], 1)]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 40), st.integers(1, 12)), max_size=8),
       st.lists(st.integers(0, 60), max_size=20))
def test_each_address_goes_to_the_mapping_holding_it(spans, addresses):
    """_symbolize visits only the mappings that hold an address; every address must still get
    the mapping a scan of all of them gives: the last starting at or below it, up to its limit
    or the next mapping's start, whichever comes first (mappings may overlap or leave gaps)."""
    agg = WindowAggregator("node-a", 10, 100, PathSymbolizer(), clock=lambda: BASE)
    maps = [{"start": s * 0x100, "limit": (s + n) * 0x100, "offset": 0, "path": f"/m{k}",
             "build_id": ""} for k, (s, n) in enumerate(spans)]
    agg.add_process(dict(process(7), mappings=maps))
    meta = agg.processes[7]
    addresses = sorted({a * 0x40 for a in addresses})
    mappings, frames = agg._symbolize(meta, [(a,) for a in addresses], addresses)
    expected = {}
    for a in addresses:
        for i, m in enumerate(meta.mappings):
            end = m.limit if i + 1 == len(meta.mappings) else min(m.limit, meta.starts[i + 1])
            if m.start <= a < end:
                expected[a] = m
    assert mappings == expected
    assert {a: f.function for a, f in frames.items()} == {
        a: f"{m.path}:{a:x}" for a, m in expected.items()}
