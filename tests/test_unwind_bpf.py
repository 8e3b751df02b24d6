"""The .eh_frame unwinder on the real kernel: full stacks of binaries without frame pointers,
over the collector's raw stream, checked against `perf record --call-graph dwarf`."""

from __future__ import annotations

import os
import subprocess
import time
from collections import Counter

import pytest

from services import wire
from services.aggregator.profile_builder import MappingInfo
from services.aggregator.symbols import Symbolizer
from tests.conftest import require_tool
from tests.helpers.services import (
    Subscriber,
    service_env,
    start_service,
    stop,
    wait_until,
)
from tests.helpers.workload import compile_c

pytestmark = pytest.mark.bpf

FREQUENCY = 499  # more samples per second: proportions need about a thousand of them

# main -> outer -> middle -> leaf (3/4 of the work) and main -> outer -> side (1/4).
OMIT_FP_SOURCE = r"""
#include <stdlib.h>
#include <time.h>
__attribute__((noinline)) unsigned long leaf(unsigned long n) {
    for (unsigned long i = 0; i < 300000; i++) n = n * 6364136223846793005UL + i;
    return n;
}
__attribute__((noinline)) unsigned long side(unsigned long n) {
    for (unsigned long i = 0; i < 100000; i++) n = n * 2862933555777941757UL + i;
    return n;
}
__attribute__((noinline)) unsigned long middle(unsigned long n) { return leaf(n) * 3 + 1; }
__attribute__((noinline)) unsigned long outer(unsigned long n) { return middle(n) ^ side(n); }
int main(int argc, char **argv) {
    double seconds = argc > 1 ? atof(argv[1]) : 0;
    time_t start = time(0);
    volatile unsigned long sink = 0;
    while (seconds == 0 || time(0) - start < seconds) sink += outer(sink);
    return (int)(sink & 1);
}
"""
OMIT_FP_FLAGS = ["-O2", "-fomit-frame-pointer", "-fno-inline", "-fno-optimize-sibling-calls"]
LEAF_PATH = ["leaf", "middle", "outer", "main"]
SIDE_PATH = ["side", "outer", "main"]


@pytest.fixture(scope="module")
def collector(tmp_path_factory):
    from tests.conftest import IN_CI, bpf_missing_reason

    reason = bpf_missing_reason()
    if reason:
        if IN_CI:
            pytest.fail(f"BPF test cannot run under CI=true: {reason}")
        pytest.skip(reason)
    run_dir = str(tmp_path_factory.mktemp("run"))
    cache_dir = str(tmp_path_factory.mktemp("cache"))
    log = os.path.join(run_dir, "collector.log")
    env = service_env(run_dir, cache_dir, sampling_frequency=str(FREQUENCY))
    p = start_service("collector", env, log)
    sock = os.path.join(run_dir, wire.ENDPOINT_COLLECTOR)
    assert wait_until(lambda: os.path.exists(sock) or p.poll() is not None, 90)
    assert p.poll() is None, open(log).read()
    yield run_dir
    assert stop(p) == 0, open(log).read()


@pytest.fixture(scope="module")
def omit_fp_binary(tmp_path_factory):
    require_tool("gcc")
    directory = tmp_path_factory.mktemp("omitfp")
    os.chmod(directory, 0o755)
    return compile_c(OMIT_FP_SOURCE, directory / "omitfp", OMIT_FP_FLAGS)


class StackNames:
    """Symbolized user stacks of one process from the raw stream."""

    def __init__(self):
        self.symbolizer = Symbolizer()
        self.mappings: list[MappingInfo] = []

    def names(self, addresses: list[int]) -> list[str]:
        out = []
        for a in addresses:
            m = next((m for m in self.mappings if m.start <= a < m.limit), None)
            frame = self.symbolizer.symbolize(m, [m.path], [a])[a] if m else None
            out.append(frame.function if frame and frame.function else "?")
        return out


def _stacks(run_dir: str, pid: int, warm: float, seconds: float, names: StackNames,
            reached: str) -> Counter:
    """Symbolized user stacks of pid (tuples, innermost first; () when none) with their counts,
    over `seconds`, once the stream shows a stack reaching `reached` (tables are loaded) or
    `warm` seconds passed."""
    sub = Subscriber(run_dir, wire.ENDPOINT_COLLECTOR, [wire.TOPIC_SAMPLES, wire.TOPIC_PROCESS])
    counts: Counter = Counter()
    try:
        started, measuring_since = time.monotonic(), None
        for msg in sub.messages(warm + seconds + 2):
            if msg.type == "process":
                if msg.body["pid"] == pid:
                    names.mappings = [MappingInfo(m["start"], m["limit"], m["offset"], m["path"],
                                                  m["build_id"]) for m in msg.body["mappings"]]
                continue
            if not names.mappings:
                continue
            batch = Counter()
            for p, _tid, _cg, u, _k, count in msg.body["records"]:
                if p == pid:
                    stack = tuple(names.names(msg.body["stacks"][u])) if u >= 0 else ()
                    batch[stack] += count
            now = time.monotonic()
            if measuring_since is None:
                if any(reached in s for s in batch) or now - started > warm:
                    measuring_since = now  # this batch may hold stacks from before: skip it
                continue
            counts.update(batch)
            if now - measuring_since >= seconds:
                break
    finally:
        sub.close()
    return counts


def _shares(counts: Counter) -> dict[str, float]:
    total = sum(counts.values())
    full = sum(c for s, c in counts.items() if list(s[:4]) == LEAF_PATH or list(s[:3]) == SIDE_PATH)
    side = sum(c for s, c in counts.items() if s and s[0] == "side")
    leaf = sum(c for s, c in counts.items() if s and s[0] == "leaf")
    return {"total": total, "full": full / total, "side": side / total, "leaf": leaf / total}


def _perf_stacks(binary, seconds: float, out_dir) -> Counter:
    data = os.path.join(out_dir, "perf.data")
    r = subprocess.run(["perf", "record", "-q", "-e", "cpu-clock", "-F", str(FREQUENCY),
                        "--call-graph", "dwarf", "-o", data, "--", str(binary), str(seconds)],
                       capture_output=True, text=True, timeout=seconds + 60)
    assert os.path.exists(data), r.stderr
    script = subprocess.run(["perf", "script", "-i", data, "-F", "comm,ip,sym"],
                            capture_output=True, text=True, timeout=120).stdout
    counts: Counter = Counter()
    for block in script.strip().split("\n\n"):
        lines = block.strip().splitlines()
        if lines and lines[0].strip() == os.path.basename(binary):
            counts[tuple(line.split()[1] for line in lines[1:] if len(line.split()) > 1)] += 1
    return counts


def test_stacks_without_frame_pointers_reach_main_and_match_perf(collector, omit_fp_binary,
                                                                 tmp_path):
    require_tool("perf")
    workload = subprocess.Popen([str(omit_fp_binary), "0"])
    try:
        ours = _stacks(collector, workload.pid, warm=20, seconds=6, names=StackNames(),
                       reached="main")
    finally:
        workload.kill()
        workload.wait()
    perf = _perf_stacks(omit_fp_binary, 6, tmp_path)
    mine, theirs = _shares(ours), _shares(perf)
    print("ours", mine, "perf", theirs, ours.most_common(4))
    assert mine["total"] >= 500, ours.most_common(5)
    assert mine["full"] >= 0.95, ours.most_common(8)
    assert theirs["total"] >= 500 and theirs["full"] >= 0.9, perf.most_common(5)
    for key in ("side", "leaf"):
        assert abs(mine[key] - theirs[key]) <= 0.05, (key, mine, theirs)


def test_debian_python_native_stacks_reach_py_bytes_main(collector):
    python = "/usr/bin/python3"
    workload = subprocess.Popen([python, "-c", "while True: pass"])
    try:
        counts = _stacks(collector, workload.pid, warm=25, seconds=4, names=StackNames(),
                         reached="Py_BytesMain")
    finally:
        workload.kill()
        workload.wait()
    total = sum(counts.values())
    reaching = sum(c for s, c in counts.items() if "Py_BytesMain" in s)
    print(total, reaching, counts.most_common(3))
    assert total >= 300
    assert reaching / total >= 0.95, counts.most_common(5)
    # The interpreter's own frames are there too, under Py_BytesMain.
    assert any("_PyEval_EvalFrameDefault" in s for s in counts), counts.most_common(3)


def test_walks_are_counted_by_how_they_ended(collector, omit_fp_binary):
    """The heartbeat's counters: walks happened, ended at the outermost frame, and found
    most rows in the row cache."""
    workload = subprocess.Popen([str(omit_fp_binary), "0"])
    sub = Subscriber(collector, wire.ENDPOINT_COLLECTOR, [b"heartbeat.collector"])
    try:
        def counters(msg):
            return {name.removeprefix("parca_agent_collector_"): value
                    for name, labels, value in msg.body["metrics"]}
        # The row cache: a hot loop's few pcs are searched once, then found in the cache.
        seen = sub.wait_for(lambda m: counters(m).get("unwind_end_outermost_total", 0) > 0
                            and counters(m).get("unwind_processes", 0) > 0
                            and counters(m).get("unwind_row_cache_hits_total", 0)
                            > counters(m).get("unwind_row_searches_total", 0) > 0, 20)
    finally:
        sub.close()
        workload.kill()
        workload.wait()
    assert seen is not None, "no heartbeat counted a walk that reached the outermost frame"
    metrics = {name.removeprefix("parca_agent_collector_"): value
               for name, labels, value in seen.body["metrics"]}
    ends = sum(v for k, v in metrics.items() if k.startswith("unwind_end_"))
    assert metrics["unwind_stacks_total"] > 0 and ends > 0
    assert metrics["unwind_end_outermost_total"] >= 0.5 * ends, metrics
