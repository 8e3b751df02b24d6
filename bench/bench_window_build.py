"""How long the aggregator takes to build the profile of a big window, and its peak memory.

The aggregator's own path (WindowAggregator.add_samples, then close_due), not a piece of it:
one `samples` body of 50,000 distinct stacks of 20 frames (4 kernel + 16 user), for one
target (a container: one cgroup) of 20 processes forked from one program, so they share their
mappings — 10 real shared objects and executables of this machine, named by the real
symbolizer from their ELF symbol tables. User addresses come from a pool of 5,000 (so a
window has a program's worth of distinct functions), kernel ones from 500.

The window is built ROUNDS times in one process: the first round also loads the symbol
tables (cold), the later ones find them cached, as every window after an agent's first does.
The figure is the median of the later rounds; the cold round is reported beside it.
Prints a table and a JSON line. Run: .venv/bin/python bench/bench_window_build.py
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from services import runtime  # noqa: E402
from services.aggregator.symbols import Symbolizer  # noqa: E402
from services.aggregator.windows import WindowAggregator  # noqa: E402

FILES = ["/usr/bin/python3", "libc.so.6", "libm.so.6", "libcrypto.so.3", "libexpat.so.1",
         "libffi.so.8", "libbz2.so.1.0", "liblzma.so.5", "libz.so.1", "libzstd.so.1"]
LIB_DIRS = ["/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64", "/usr/lib64"]
NOW_NS = 1_764_000_000_000_000_000
PROCESSES = 20
CGROUP = 4242


def _files() -> list[str]:
    found = []
    for name in FILES:
        for d in [""] if name.startswith("/") else LIB_DIRS:
            path = os.path.realpath(os.path.join(d, name))
            if os.path.isfile(path) and path not in found:
                found.append(path)
                break
    if not found:
        raise SystemExit("no ELF files found to map")
    return found


def make_window(n_stacks: int, depth: int, seed: int = 1):
    rng = random.Random(seed)
    mappings, start = [], 0x7f00_0000_0000
    for i, path in enumerate(_files()):
        size = os.path.getsize(path)
        mappings.append({"start": start, "limit": start + size, "offset": 0, "path": path,
                         "build_id": "", "cache_path": ""})
        start += (size + 0xfff_ffff) & ~0xfff_ffff
    user_pool = [m["start"] + rng.randrange(0x1000, m["limit"] - m["start"])
                 for m in (mappings[i % len(mappings)] for i in range(5000))]
    kernel_pool = [0xffff_ffff_8100_0000 + 32 * i for i in range(500)]
    kernel_depth = min(4, depth)
    seen, stacks = set(), []
    while len(stacks) < 2 * n_stacks:
        user = tuple(rng.choice(user_pool) for _ in range(depth - kernel_depth))
        kernel = tuple(rng.choice(kernel_pool) for _ in range(kernel_depth))
        if (user, kernel) not in seen:
            seen.add((user, kernel))
            stacks += [list(user), list(kernel)]
    records = [[1000 + i % PROCESSES, 1000 + i % PROCESSES, CGROUP, 2 * i, 2 * i + 1, 1 + i % 3]
               for i in range(n_stacks)]
    body = {"time_ns": NOW_NS, "duration_ns": 10**9, "frequency": 100, "records": records,
            "stacks": stacks, "kernel_symbols": {a: f"kernel_fn_{i}"
                                                 for i, a in enumerate(kernel_pool)},
            "errors": {}}
    processes = [{"pid": 1000 + p, "start_time": 1, "comm": "bench", "executable": mappings[0]["path"],
                  "mappings": mappings} for p in range(PROCESSES)]
    return processes, body


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stacks", type=int, default=50_000)
    parser.add_argument("--depth", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    processes, body = make_window(args.stacks, args.depth)
    aggregator = WindowAggregator("bench", 10, 100, Symbolizer(), clock=lambda: NOW_NS)
    aggregator.apply_targets({"targets": [{"labels": {"container": "bench"},
                                           "cgroup_ids": [CGROUP], "pids": []}],
                              "filtering": False})
    for p in processes:
        aggregator.add_process(p)
    runtime.settle_gc()  # as the service does after start-up
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rounds = []
    for _ in range(args.rounds):
        # CPU time too: on a shared machine the wall time includes waiting for a core.
        t0, c0 = time.perf_counter(), time.process_time()
        aggregator.add_samples(body)
        t1, c1 = time.perf_counter(), time.process_time()
        profiles = aggregator.close_due(force=True)
        t2, c2 = time.perf_counter(), time.process_time()
        assert len(profiles) == 1 and profiles[0]["samples"] == sum(r[5] for r in body["records"])
        rounds.append({"add_s": t1 - t0, "build_s": t2 - t1, "total_s": t2 - t0,
                       "total_cpu_s": c2 - c0, "gzipped_bytes": len(profiles[0]["pprof"])})
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    warm = rounds[1:] or rounds

    def med(key):
        return round(statistics.median(r[key] for r in warm), 3)

    result = {
        "stacks": args.stacks, "depth": args.depth, "processes": PROCESSES,
        "mapped_files": len(processes[0]["mappings"]), "rounds": args.rounds,
        "add_s": med("add_s"), "build_s": med("build_s"), "total_s": med("total_s"),
        "total_cpu_s": med("total_cpu_s"),
        "total_s_each": [round(r["total_s"], 3) for r in rounds],
        "cold_total_s": round(rounds[0]["total_s"], 3),
        "gzipped_bytes": rounds[-1]["gzipped_bytes"],
        "peak_rss_mb": round(rss_after / 1024, 1),
        "peak_rss_growth_mb": round((rss_after - rss_before) / 1024, 1),
    }
    width = max(len(k) for k in result)
    for key, value in result.items():
        print(f"{key:<{width}}  {value}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
