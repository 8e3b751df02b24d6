"""Start and memory: time from `parca-agent` start to its first profile in /api/targets, and the
peak RSS (VmHWM) of each of its processes after --duration seconds on a busy host.

Windows are aligned to wall-clock multiples of the profiling duration (10 s) and close 1.5 s
after their end, so the first profile comes at the first window end after sampling began plus
that grace: "first profile" varies by up to one window with the moment of start; "sampling"
(the collector's first drained samples) does not.
"""

from __future__ import annotations

import shutil
import time

from bench.common import Agent, agent_pids, agent_processes, cpu_seconds, log, status_mb, table, \
    wait_sampling, wait_until
from bench.workloads import Workload, build_chain, work_dir

NAME = "start"
DEFAULT_DURATION = 300.0


def add_arguments(parser) -> None:
    parser.add_argument("--duration", type=float, default=DEFAULT_DURATION,
                        help="seconds on a busy host before reading peak RSS (default %(default)s)")


def run(args) -> dict:
    directory = work_dir()
    binary = build_chain(directory, "fp")
    # The host is busy before the agent starts, as it would be on a node.
    workload = Workload(binary, chains=2, pythons=1).start(0)
    agent = None
    try:
        started = time.monotonic()
        agent = Agent(duration="10s")
        wait_sampling(agent, 120)
        sampling_s = time.monotonic() - started
        first = wait_until(lambda: [t for t in agent.targets() if t["last_profile_time"]], 120,
                           interval=0.2)
        if not first:
            raise RuntimeError(f"no profile within 120 s of sampling:\n{agent.log()}")
        started_s = time.monotonic() - started
        log(f"start: sampling after {sampling_s:.1f}s, first profile after {started_s:.1f}s; "
            f"running until {args.duration:g}s")
        time.sleep(max(0.0, args.duration - (time.monotonic() - started)))
        processes = agent_processes(agent)
        peak = {name: status_mb(pid, "VmHWM") for name, pid in sorted(processes.items())}
        now = {name: status_mb(pid, "VmRSS") for name, pid in sorted(processes.items())}
        cpu = cpu_seconds(agent_pids(agent))
        wall = time.monotonic() - started
        targets = len(agent.targets())
    finally:
        workload.stop()
        workload.kill()
        if agent:
            agent.terminate(timeout=30)
            agent.cleanup()
        shutil.rmtree(directory, ignore_errors=True)
    print(table(["process", "peak RSS MB", "RSS MB now"],
                [[name, peak[name], now[name]] for name in peak]))
    print(table(["figure", "value"], [["start to sampling s", round(sampling_s, 2)],
                                      ["start to first profile s", round(started_s, 2)],
                                      ["agent CPU-s per s incl. start", round(cpu / wall, 4)]]))
    return {"args": {"duration": args.duration}, "short": args.duration < DEFAULT_DURATION,
            "start_to_sampling_s": round(sampling_s, 2),
            "start_to_first_profile_s": round(started_s, 2),
            "profiling_duration_s": 10, "run_s": round(wall, 1), "targets": targets,
            "peak_rss_mb": peak, "rss_mb_at_end": now,
            "max_service_peak_rss_mb": max(v for k, v in peak.items() if v is not None
                                           and k not in ("parca-agent", "supervisord")),
            "agent_cpu_per_s_incl_start": round(cpu / wall, 4)}
