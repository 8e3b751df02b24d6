"""Overhead: the agent, `perf record` and bcc's profile tool on the same busy machine.

Both cores are kept busy by two C chain processes and one Python process. Each profiler (and
none) runs for --duration seconds while the workload runs, in interleaved order (none, agent,
perf, bcc, none, ...) so that a drift in the machine's load hits every profiler alike, repeated
--repeats times; medians are reported.

- CPU "window": what the profiler's processes used while the workload ran, per wall second.
- CPU "total": everything from its start to its exit (the agent: to just before it stops),
  divided by the same duration; for bcc this includes compiling its program and printing.
- Neither counts the BPF programs or perf's sampling in interrupt context: the kernel charges
  that to the interrupted task, the workload, which is why its throughput is measured too.
  The BPF programs' own run time (the agent's and bcc's) is measured apart, from the kernel's
  BPF statistics (bench/bpf_stats.py), and reported beside the CPU columns: it is the part of
  the slowdown a profiler's design decides, and unlike the workload's throughput it is not
  lost in the machine's noise. perf's sampling work (the kernel's frame-pointer walk) has no
  such counter.
- Slowdown: three busy processes share two cores, and how the scheduler splits them moves each
  kind's wall rate by +-10 % between rounds with no profiler at all. So the goal's figure is
  the work the whole workload got done: each kind's iterations divided by what an iteration
  costs (CPU seconds per iteration, from its own CPU clock, in the rounds without a profiler),
  summed, per wall second: the CPUs' worth of work the workload got. A profiler lowers it by
  the CPU it takes from the workload and by the sampling work the kernel charges to it; the
  split between the kinds does not move it. Each kind's own rate is reported beside it.
- The agent keeps one cache directory across its rounds, as it does across restarts on a host:
  round 1 builds the workload's unwind tables (libpython's alone takes about a second of CPU)
  and stores them; later rounds read them back. Round 1's figure is reported on its own.
"""

from __future__ import annotations

import os
import shutil

from bench import bpf_stats
from bench.common import log, median, ratio, table
from bench.profilers import all_profilers
from bench.workloads import Workload, build_chain, work_dir

NAME = "overhead"
DEFAULT_DURATION = 60.0
DEFAULT_REPEATS = 3


def add_arguments(parser) -> None:
    parser.add_argument("--duration", type=float, default=DEFAULT_DURATION,
                        help="seconds each profiler runs (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=DEFAULT_REPEATS,
                        help="interleaved rounds (default %(default)s)")


def trial(profiler, binary: str, duration: float) -> dict:
    directory = work_dir()
    try:
        programs_before = bpf_stats.snapshot()
        profiler.start(duration, directory)
        by_service = getattr(profiler, "cpu_by_service", None)
        services0 = by_service() if by_service else {}
        programs0 = bpf_stats.snapshot()
        cpu0 = profiler.cpu()
        workload = Workload(binary, chains=2, pythons=1).start(duration)
        try:
            rates = workload.wait(duration + 60)
        finally:
            workload.kill()
        cpu1 = profiler.cpu()
        programs1 = bpf_stats.snapshot()
        services1 = by_service() if by_service else {}
        bpf = bpf_stats.delta(programs_before, programs0, programs1)
        total = profiler.stop()
        return {"profiler": profiler.name, "cpu_window_s": round(cpu1 - cpu0, 3),
                "cpu_total_s": round(total, 3), "c_rate": round(rates["c"], 2),
                "python_rate": round(rates["python"], 2),
                "workload": {kind: {k: round(v, 6) for k, v in t.items()}
                             for kind, t in workload.totals.items()},
                "perf_output_mb": getattr(profiler, "output_mb", None) if profiler.name == "perf"
                else None,
                "settle_s": getattr(profiler, "settle_s", None),
                "bpf_window": bpf,
                "services_cpu_window_s": {n: round(services1[n] - services0.get(n, 0.0), 4)
                                          for n in services1} or None}
    finally:
        profiler.cleanup()
        shutil.rmtree(directory, ignore_errors=True)


def summarize(trials: list[dict], duration: float) -> dict:
    by_profiler: dict[str, dict] = {}
    for name in dict.fromkeys(t["profiler"] for t in trials):
        mine = [t for t in trials if t["profiler"] == name and "error" not in t]
        by_profiler[name] = {
            "trials": len(mine),
            "cpu_window_per_s": _rnd(median([t["cpu_window_s"] / duration for t in mine])),
            "cpu_total_per_s": _rnd(median([t["cpu_total_s"] / duration for t in mine])),
            "c_rate": median([t["c_rate"] for t in mine]),
            "python_rate": median([t["python_rate"] for t in mine]),
        }
    agent_trials = [t for t in trials if t["profiler"] == "agent" and "error" not in t
                    and t.get("services_cpu_window_s")]
    if agent_trials and agent_trials[0].get("round") == 1:
        by_profiler["agent"]["first_round_cpu_window_per_s"] = _rnd(
            agent_trials[0]["cpu_window_s"] / duration)
    if agent_trials and "agent" in by_profiler:
        names = dict.fromkeys(n for t in agent_trials for n in t["services_cpu_window_s"])
        by_profiler["agent"]["services_cpu_window_per_s"] = {
            n: _rnd(median([t["services_cpu_window_s"].get(n, 0.0) / duration
                            for t in agent_trials])) for n in names}
    for name, s in by_profiler.items():
        with_bpf = [t["bpf_window"] for t in trials if t["profiler"] == name
                    and "error" not in t and t.get("bpf_window") and t["bpf_window"]["runs"]]
        if with_bpf:
            s["bpf_per_s"] = _rnd(median([b["run_time_s"] / duration for b in with_bpf]))
            s["bpf_us_per_run"] = round(median([b["run_time_s"] / b["runs"] * 1e6
                                                for b in with_bpf]), 2)
    _work(trials, by_profiler, duration)
    base = by_profiler.get("none", {})
    perf = by_profiler.get("perf", {})
    perf_windows = by_profiler.get("perf-10s", {})
    for name, s in by_profiler.items():
        for key in ("cpu_window_per_s", "cpu_total_per_s"):
            s[key.replace("per_s", "ratio_to_perf")] = ratio(s[key], perf.get(key)) \
                if name != "none" else None
            # Against perf making a recording per window as the agent does (its total: every
            # run's start and exit is part of producing those recordings).
            s[key.replace("per_s", "ratio_to_perf_10s")] = ratio(
                s[key], perf_windows.get("cpu_total_per_s")) if name != "none" else None
        for kind in ("c", "python"):
            b, r = base.get(f"{kind}_rate"), s[f"{kind}_rate"]
            s[f"{kind}_slowdown_pct"] = round((1 - r / b) * 100, 2) if b and r else None
    return by_profiler


def _work(trials: list[dict], by_profiler: dict, duration: float) -> None:
    """Per profiler: the workload's work per wall second in CPUs' worth of unprofiled work
    (see the module's docstring), its slowdown against none, and each kind's iterations per
    CPU second of its own (what in-kernel sampling costs it shows there)."""
    ok = [t for t in trials if "error" not in t and t.get("workload")]
    baseline = [t for t in ok if t["profiler"] == "none"]
    if not baseline:
        return
    kinds = list(baseline[0]["workload"])
    per_cpu = {k: median([t["workload"][k]["iterations"] / t["workload"][k]["cpu"]
                          for t in baseline if t["workload"][k]["cpu"] > 0]) for k in kinds}
    if any(v is None or v <= 0 for v in per_cpu.values()):
        return
    for name, s in by_profiler.items():
        mine = [t for t in ok if t["profiler"] == name]
        if not mine:
            continue
        s["work_cpus"] = _rnd(median([sum(t["workload"][k]["iterations"] / per_cpu[k]
                                          for k in kinds) / duration for t in mine]))
        for k in kinds:
            s[f"{k}_per_cpu_s"] = round(median([t["workload"][k]["iterations"]
                                                / t["workload"][k]["cpu"] for t in mine]), 2)
    base = by_profiler["none"]
    for name, s in by_profiler.items():
        s["work_slowdown_pct"] = round((1 - s["work_cpus"] / base["work_cpus"]) * 100, 2) \
            if s.get("work_cpus") and base.get("work_cpus") else None
        for k in kinds:
            b, r = base.get(f"{k}_per_cpu_s"), s.get(f"{k}_per_cpu_s")
            s[f"{k}_per_cpu_loss_pct"] = round((1 - r / b) * 100, 2) if b and r else None


def _rnd(x):
    return round(x, 4) if x is not None else None


def run(args) -> dict:
    directory = work_dir()
    binary = build_chain(directory, "fp")
    agent_cache = os.path.join(directory, "agent-cache")
    os.makedirs(agent_cache, mode=0o755)
    profilers = all_profilers(agent_cache_dir=agent_cache)
    trials = []
    try:
        with bpf_stats.enabled() as counting:
            if not counting:
                log("overhead: kernel.bpf_stats_enabled cannot be set: no BPF run times")
            for repeat in range(args.repeats):
                for profiler in profilers:
                    log(f"overhead: round {repeat + 1}/{args.repeats}, {profiler.name}, "
                        f"{args.duration:g}s")
                    try:
                        result = trial(profiler, binary, args.duration)
                    except Exception as e:  # one failing profiler must not void the others'
                        log(f"overhead: {profiler.name} failed: {e}")
                        result = {"profiler": profiler.name, "error": str(e)[:500]}
                    result["round"] = repeat + 1
                    trials.append(result)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    summary = summarize(trials, args.duration)
    rows = [[name, s["cpu_window_per_s"], s["cpu_window_ratio_to_perf"],
             s["cpu_window_ratio_to_perf_10s"], s.get("bpf_per_s"), s.get("bpf_us_per_run"),
             s["cpu_total_per_s"],
             s["cpu_total_ratio_to_perf"], s.get("work_cpus"), s.get("work_slowdown_pct"),
             s["c_rate"], s["c_slowdown_pct"], s["python_rate"],
             s["python_slowdown_pct"]] for name, s in summary.items()]
    print(table(["profiler", "cpu/s", "÷perf", "÷perf-10s", "bpf cpu/s", "bpf µs/run",
                 "cpu/s total", "÷perf total",
                 "work CPUs", "work slow %", "C it/s", "C slow %", "py it/s", "py slow %"],
                rows))
    return {"args": {"duration": args.duration, "repeats": args.repeats},
            "short": args.duration < DEFAULT_DURATION or args.repeats < DEFAULT_REPEATS,
            "notes": {p.name: p.note for p in profilers},
            "summary": summary, "trials": trials}
