"""Windows and targets in the aggregator: edges, grouping, filtering, sampling, pprof output."""

from __future__ import annotations

import gzip

import services.proto_gen  # noqa: F401
from pprof import profile_pb2

from services.aggregator.symbols import Symbolizer
from services.aggregator.windows import GRACE_NS, WindowAggregator

SECOND = 1_000_000_000
BASE = 1_700_000_000 * SECOND  # a multiple of 10 s


def batch(time_ns, records, stacks=None, kernel=None):
    return {"time_ns": time_ns, "duration_ns": SECOND, "frequency": 100, "records": records,
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
    agg = make()
    agg.add_process(process(7))
    times = [BASE + 8 * SECOND, BASE + 9 * SECOND + SECOND - 1, BASE + 10 * SECOND,
             BASE + 11 * SECOND]
    for t in times:
        agg.add_samples(batch(t, [[7, 7, 1, 0, -1, 5]]))
    assert agg.close_due(BASE + 10 * SECOND + GRACE_NS - 1) == []  # still inside the grace
    first = agg.close_due(BASE + 10 * SECOND + GRACE_NS)
    assert [p["samples"] for p in first] == [10]
    assert (first[0]["start_ns"], first[0]["end_ns"]) == (BASE, BASE + 10 * SECOND)
    second = agg.close_due(BASE + 20 * SECOND + GRACE_NS)
    assert [p["samples"] for p in second] == [10]
    assert agg.close_due(BASE + 100 * SECOND) == []  # nothing twice


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
