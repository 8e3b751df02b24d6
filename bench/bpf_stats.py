"""What BPF programs cost in the kernel: their run time and run count (kernel.bpf_stats_enabled).

A perf-event program runs in the timer interrupt of the CPU it samples, and the kernel charges
that time to the interrupted task: the workload, not the profiler's processes. /proc therefore
shows only the profiler's user-space side; these counters show the rest. Turning the
statistics on costs every program two clock reads a run (measured here: ~0.3 us).
"""

from __future__ import annotations

import json
import subprocess
from contextlib import contextmanager

SYSCTL = "/proc/sys/kernel/bpf_stats_enabled"


@contextmanager
def enabled():
    """kernel.bpf_stats_enabled=1 for the block, then its former value. Yields False (and
    changes nothing) where the sysctl cannot be written."""
    try:
        with open(SYSCTL) as fh:
            before = fh.read().strip()
        with open(SYSCTL, "w") as fh:
            fh.write("1")
    except OSError:
        yield False
        return
    try:
        yield True
    finally:
        with open(SYSCTL, "w") as fh:
            fh.write(before)


def snapshot() -> dict[int, tuple[str, int, int]]:
    """Every loaded program: id -> (name, run_time_ns, run_cnt). Empty if bpftool fails."""
    try:
        out = subprocess.run(["bpftool", "prog", "show", "--json"], capture_output=True,
                             text=True, timeout=30, check=True).stdout
        progs = json.loads(out)
    except (OSError, subprocess.SubprocessError, ValueError):
        return {}
    return {p["id"]: (p.get("name", ""), p.get("run_time_ns", 0), p.get("run_cnt", 0))
            for p in progs if "id" in p}


def delta(before_start: dict, window_start: dict, window_end: dict) -> dict | None:
    """The run time and runs, over the window, of the programs that were loaded after
    ``before_start`` (the profiler's own: a host may run other programs). None when the
    profiler loaded none."""
    mine = [i for i in window_end if i not in before_start and i in window_start]
    if not mine:
        return None
    ns = sum(window_end[i][1] - window_start[i][1] for i in mine)
    runs = sum(window_end[i][2] - window_start[i][2] for i in mine)
    return {"programs": sorted({window_end[i][0] for i in mine}), "run_time_s": ns / 1e9,
            "runs": runs}
