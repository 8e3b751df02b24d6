"""How long ProfileBuilder takes for a big window, and how much memory it peaks at.

50,000 distinct stacks of 20 frames (4 kernel + 16 user over 10 mapped files and 5,000
distinct user addresses), each added once, then built. Prints a table and a JSON line.
Run: .venv/bin/python bench/bench_profile_builder.py [--stacks N] [--depth D]
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from services.aggregator.profile_builder import Frame, MappingInfo, ProfileBuilder  # noqa: E402


def make_stacks(n_stacks: int, depth: int, seed: int = 1):
    rng = random.Random(seed)
    mappings = [MappingInfo(0x400000 + i * 0x1000000, 0x400000 + i * 0x1000000 + 0x800000, 0,
                            f"/usr/lib/libbench{i}.so", f"{i:040x}") for i in range(10)]
    user_pool = []
    for i in range(5000):
        m = mappings[i % len(mappings)]
        address = m.start + 16 * i
        frame = Frame(f"ns{i % 50}::function_{i}(int)") if i % 7 else None  # some unknown
        user_pool.append((m, address, frame))
    kernel_pool = [(0xffffffff81000000 + 32 * i, f"kernel_fn_{i}") for i in range(500)]
    kernel_depth = min(4, depth)
    stacks = set()
    out = []
    while len(out) < n_stacks:
        user = tuple(rng.choice(user_pool) for _ in range(depth - kernel_depth))
        kernel = tuple(rng.choice(kernel_pool) for _ in range(kernel_depth))
        if (user, kernel) in stacks:
            continue
        stacks.add((user, kernel))
        out.append((list(user), list(kernel)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stacks", type=int, default=50_000)
    parser.add_argument("--depth", type=int, default=20)
    args = parser.parse_args()
    stacks = make_stacks(args.stacks, args.depth)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    builder = ProfileBuilder(period_ns=10_000_000, time_ns=time.time_ns(), duration_ns=10**10)
    # CPU time too: on a shared machine the wall time includes waiting for a core.
    t0, c0 = time.perf_counter(), time.process_time()
    for i, (user, kernel) in enumerate(stacks):
        builder.add_sample(user, kernel, 1 + i % 3, {"pid": 1000 + i % 20, "comm": "bench"})
    t1, c1 = time.perf_counter(), time.process_time()
    blob = builder.build()
    t2, c2 = time.perf_counter(), time.process_time()
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = {
        "stacks": args.stacks, "depth": args.depth,
        "add_s": round(t1 - t0, 3), "build_s": round(t2 - t1, 3), "total_s": round(t2 - t0, 3),
        "add_cpu_s": round(c1 - c0, 3), "build_cpu_s": round(c2 - c1, 3),
        "total_cpu_s": round(c2 - c0, 3),
        "gzipped_bytes": len(blob),
        "peak_rss_mb": round(rss_after / 1024, 1),
        "peak_rss_growth_mb": round((rss_after - rss_before) / 1024, 1),
    }
    width = max(len(k) for k in result)
    for key, value in result.items():
        print(f"{key:<{width}}  {value}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
