"""Load (reliability): 64 busy threads across 200 processes (16 processes of 4 spinning threads,
184 that wake every 50 ms) for --duration seconds, first under the agent, then under
`perf record -F 100 -a -g` on the same load: one run for the whole duration, then (unless
--perf-only) the same in 60 s pieces and in 10 s pieces, back to back.

What it shows: every sample the kernel took is accounted for — drained by the collector and
received by the aggregator, or counted by a drop, loss or error counter — and the agent's CPU
against perf's on that load (the benchmark goal: below 1.0). perf's cost is nearly all at its
start (reading every process's maps) and exit (build ids), so its CPU per second depends on how
long one recording runs: the whole duration is the most favourable to perf, 60 s pieces are
the overhead bench's anchor, and 10 s pieces produce a recording per window as the agent does.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time

from bench.common import agent_metrics, log, ratio, table
from bench.profilers import AgentProfiler, PerfProfiler, PerfWindowsProfiler
from bench.workloads import work_dir
from services.runtime import HEARTBEAT_INTERVAL

NAME = "load"
DEFAULT_DURATION = 300.0
HERE = os.path.dirname(os.path.abspath(__file__))
PROCESSES = 200
BUSY_PROCESSES, THREADS_EACH = 16, 4
# The agent's CPU is also given from this long after the load started: its steady state, as
# the overhead bench's "cpu/s" is, once the 200 new processes have been read, their tables
# loaded and their binaries' symbols read (on a fresh cache directory, as here, that includes
# building the unwind tables of the load's binaries and libc). The goal is judged on it; the
# whole run's figure is given beside it.
STEADY_AFTER = 60.0


def add_arguments(parser) -> None:
    parser.add_argument("--duration", type=float, default=DEFAULT_DURATION,
                        help="seconds under each profiler (default %(default)s)")
    parser.add_argument("--perf-only", action="store_true",
                        help="perf as one recording only, not also in 60 s and 10 s pieces")


def start_load(binary: str) -> list[subprocess.Popen]:
    return [subprocess.Popen([binary, str(THREADS_EACH if i < BUSY_PROCESSES else 0)])
            for i in range(PROCESSES)]


def stop_load(processes: list[subprocess.Popen]) -> None:
    for p in processes:
        p.kill()
    for p in processes:
        p.wait(10)


def measure(profiler, binary: str, duration: float, directory: str) -> dict:
    profiler.start(duration, directory)
    load = start_load(binary)
    try:
        time.sleep(2)  # every process has started
        by_service = isinstance(profiler, AgentProfiler)
        cpu0 = profiler.cpu()
        services0 = profiler.cpu_by_service() if by_service else {}
        steady_from = min(STEADY_AFTER, duration / 2)
        time.sleep(steady_from)
        cpu_steady = profiler.cpu()
        services_steady = profiler.cpu_by_service() if by_service else {}
        time.sleep(duration - steady_from)
        cpu1 = profiler.cpu()
        services1 = profiler.cpu_by_service() if by_service else {}
    finally:
        stop_load(load)
    result = {"cpu_per_s": round((cpu1 - cpu0) / duration, 4),
              "cpu_steady_per_s": round((cpu1 - cpu_steady) / (duration - steady_from), 4),
              "steady_from_s": steady_from}
    if services1:
        result["cpu_steady_per_s_by_process"] = {
            name: round((services1[name] - services_steady.get(name, 0.0))
                        / (duration - steady_from), 4) for name in sorted(services1)}
    if services1:
        result["cpu_per_s_by_process"] = {
            name: round((services1[name] - services0.get(name, 0.0)) / duration, 4)
            for name in sorted(services1)}
    if isinstance(profiler, AgentProfiler):
        # Let the last drain reach the aggregator and both heartbeats report it.
        time.sleep(2 * HEARTBEAT_INTERVAL + 2)
        m = agent_metrics(profiler.agent)
        result["counters"] = {k: v for k, v in m.items() if any(
            w in k for w in ("samples", "lost", "dropped", "malformed", "stack_errors",
                             "count_entries"))}
        drained = m.get("parca_agent_collector_samples_total", 0)
        received = m.get("parca_agent_aggregator_samples_received_total", 0)
        # Message losses count messages, not samples; listed for the reader to weigh.
        reported = {k: v for k, v in m.items() if "lost" in k or "dropped" in k}
        result.update(samples_seen_in_kernel=m.get("parca_agent_collector_bpf_samples_seen_total"),
                      samples_drained=drained, samples_received=received,
                      samples_unaccounted=drained - received,
                      # /metrics shows each service's last heartbeat: the two totals may be
                      # one heartbeat interval apart in time, i.e. that many samples on every
                      # CPU, twice over for safety.
                      tolerance=int(2 * HEARTBEAT_INTERVAL * (os.cpu_count() or 1) * 100),
                      losses_reported=reported)
    result["cpu_total_per_s"] = round(profiler.stop() / duration, 4)
    return result


def run(args) -> dict:
    directory = work_dir()
    binary = os.path.join(directory, "load_worker")
    subprocess.run(["gcc", "-O2", "-g", "-fno-omit-frame-pointer", "-pthread", "-o", binary,
                    os.path.join(HERE, "load_worker.c")], check=True, capture_output=True)
    results = {}
    try:
        anchors = [PerfProfiler()] + ([] if args.perf_only else [
            PerfWindowsProfiler(60.0), PerfWindowsProfiler(10.0)])
        for profiler in [AgentProfiler()] + anchors:
            log(f"load: {profiler.name}, {args.duration:g}s")
            try:
                results[profiler.name] = measure(profiler, binary, args.duration, directory)
            finally:
                profiler.cleanup()
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    agent, perf = results["agent"], results["perf"]
    cpu_ratio = ratio(agent["cpu_per_s"], perf["cpu_per_s"])
    windowed = {name: {"cpu_per_s": r["cpu_per_s"], "cpu_total_per_s": r["cpu_total_per_s"],
                       "agent_ratio": ratio(agent["cpu_per_s"], r["cpu_per_s"]),
                       "agent_steady_ratio": ratio(agent["cpu_steady_per_s"], r["cpu_per_s"])}
                for name, r in results.items() if name.startswith("perf-")}
    print(table(["figure", "value"], [
        ["agent CPU-s per s", agent["cpu_per_s"]],
        [f"agent CPU-s per s from {agent['steady_from_s']:g} s", agent["cpu_steady_per_s"]],
        ["perf CPU-s per s", perf["cpu_per_s"]],
        ["agent ÷ perf", cpu_ratio],
        ["perf CPU-s per s incl. its exit", perf["cpu_total_per_s"]],
        ["agent ÷ perf incl. its exit", ratio(agent["cpu_per_s"], perf["cpu_total_per_s"])]]
        + [[f"agent ÷ {name}", w["agent_ratio"]] for name, w in windowed.items()]
        + [[f"agent (steady) ÷ {name}", w["agent_steady_ratio"]]
           for name, w in windowed.items()] + [
        ["samples drained by the collector", agent["samples_drained"]],
        ["samples received by the aggregator", agent["samples_received"]],
        ["drained but not received", agent["samples_unaccounted"]],
        ["heartbeat skew tolerance (samples)", agent["tolerance"]]]))
    for name, value in agent["losses_reported"].items():
        print(f"  {name} = {value:g}")
    return {"args": {"duration": args.duration}, "short": args.duration < DEFAULT_DURATION,
            "processes": PROCESSES, "busy_threads": BUSY_PROCESSES * THREADS_EACH,
            "agent": agent, "perf": perf, "perf_windows": windowed,
            "cpu_ratio_to_perf": cpu_ratio}
