"""Churn (reliability): many short-lived processes of many distinct binaries beside one
long-lived workload, for --duration seconds at --rate processes a minute.

What it shows: each service's memory stays within a bound while processes come and go (their
metadata, mappings and symbol tables are cached and must be evicted), and no profile of the
long-lived workload is lost: every 10 s window it lived through fully shows up in /api/targets.

Bound: every service but the collector peaks under 150 MB (the benchmark goal); the collector,
which maps LLVM from the start (about 200 MB, FACTS.md), under 250 MB; and no service grows by
more than 30 MB from the end of the first minute (or the first quarter of a shorter run).
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import time

from bench.common import Agent, agent_metrics, agent_processes, status_mb, table, wait_sampling
from bench.workloads import Workload, build_chain, work_dir

NAME = "churn"
DEFAULT_DURATION = 600.0
HERE = os.path.dirname(os.path.abspath(__file__))
WINDOW_S = 10
SERVICE_BOUND_MB = 150
COLLECTOR_BOUND_MB = 250
GROWTH_BOUND_MB = 30


def add_arguments(parser) -> None:
    parser.add_argument("--duration", type=float, default=DEFAULT_DURATION,
                        help="seconds of churn (default %(default)s)")
    parser.add_argument("--rate", type=int, default=2000,
                        help="short-lived processes started a minute (default %(default)s)")
    parser.add_argument("--binaries", type=int, default=50,
                        help="distinct binaries they run (default %(default)s)")


def build_binaries(directory: str, count: int) -> list[str]:
    out = []
    for i in range(count):
        path = os.path.join(directory, f"short_{i}")
        subprocess.run(["gcc", "-O1", "-g", "-fno-omit-frame-pointer", f"-DSEED={i + 1}", "-o",
                        path, os.path.join(HERE, "short_lived.c")], check=True,
                       capture_output=True, timeout=120)
        out.append(path)
    return out


def watch_rss(agent: Agent, samples: dict[str, list[tuple[float, float]]], t: float) -> None:
    for name, pid in agent_processes(agent).items():
        rss = status_mb(pid, "VmRSS")
        if rss is not None:
            samples.setdefault(name, []).append((t, rss))


def run(args) -> dict:
    directory = work_dir()
    binaries = build_binaries(directory, args.binaries)
    chain = build_chain(directory, "fp")
    agent = Agent(duration=f"{WINDOW_S}s")
    workload = None
    children: list[subprocess.Popen] = []
    try:
        wait_sampling(agent)
        workload = Workload(chain, chains=1, pythons=0).start(0)
        pid = str(workload.pids()[0])
        began = time.time()
        started = time.monotonic()
        interval = 60.0 / args.rate
        next_spawn = started
        spawned = 0
        seen_windows: set[float] = set()
        rss: dict[str, list[tuple[float, float]]] = {}
        next_poll = started
        while (now := time.monotonic()) - started < args.duration:
            while next_spawn <= now:
                children.append(subprocess.Popen([binaries[spawned % len(binaries)]]))
                spawned += 1
                next_spawn += interval
            children = [c for c in children if c.poll() is None]
            if now >= next_poll:
                for t in agent.targets():
                    if t["labels"].get("pid") == pid and t["last_profile_time"]:
                        seen_windows.add(round(t["last_profile_time"]))
                watch_rss(agent, rss, now - started)
                next_poll = now + 1.0
            time.sleep(max(0.0, min(next_spawn, next_poll) - time.monotonic()))
        ended = time.time()
        time.sleep(WINDOW_S / 2)  # the last full window closes 1.5 s after its end
        for t in agent.targets():
            if t["labels"].get("pid") == pid and t["last_profile_time"]:
                seen_windows.add(round(t["last_profile_time"]))
        peaks = {name: status_mb(p, "VmHWM") for name, p in agent_processes(agent).items()}
        metrics = agent_metrics(agent)
    finally:
        for c in children:
            c.wait(30)
        if workload:
            workload.kill()
        agent.terminate(timeout=30)
        agent.cleanup()
        shutil.rmtree(directory, ignore_errors=True)
    # Windows (by their end) that lay wholly inside the workload's life under the agent.
    first_end = (math.floor(began / WINDOW_S) + 2) * WINDOW_S
    expected = list(range(first_end, math.floor(ended / WINDOW_S) * WINDOW_S + 1, WINDOW_S))
    missing = [e for e in expected if e not in seen_windows]
    settle = min(60.0, args.duration / 4)
    growth = {}
    for name, series in rss.items():
        after = [v for t, v in series if t >= settle]
        growth[name] = round(max(after) - after[0], 1) if after else None
    services = [n for n in peaks if n not in ("parca-agent", "supervisord")]
    within = all((peaks[n] or 0) < (COLLECTOR_BOUND_MB if n == "collector" else SERVICE_BOUND_MB)
                 and (growth.get(n) or 0) <= GROWTH_BOUND_MB for n in services)
    print(table(["process", "peak RSS MB", f"growth after {settle:g}s MB"],
                [[n, peaks[n], growth.get(n)] for n in sorted(peaks)]))
    print(table(["figure", "value"], [
        ["short-lived processes started", spawned],
        ["long-lived windows expected", len(expected)],
        ["long-lived windows missing", len(missing)],
        ["memory within bound", within]]))
    return {"args": {"duration": args.duration, "rate": args.rate, "binaries": args.binaries},
            "short": args.duration < DEFAULT_DURATION,
            "spawned": spawned, "windows_expected": len(expected),
            "windows_missing": missing, "peak_rss_mb": peaks, "rss_growth_mb": growth,
            "growth_measured_after_s": settle,
            "bounds": {"service_mb": SERVICE_BOUND_MB, "collector_mb": COLLECTOR_BOUND_MB,
                       "growth_mb": GROWTH_BOUND_MB},
            "within_bounds": within,
            "counters": {k: v for k, v in metrics.items()
                         if any(w in k for w in ("lost", "dropped", "malformed", "evict",
                                                 "processes", "samples"))}}
