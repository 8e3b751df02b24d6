"""Fidelity: the share of the C workload's samples whose stack holds the whole known chain
main -> outer -> middle -> leaf, for the agent, `perf record -g` (frame pointers) and
`perf record --call-graph dwarf`, on a build with frame pointers and one without
(-fomit-frame-pointer).

The agent's figure is read from what a user gets: its profiles of the workload's process,
merged over the run (/api/profile/<id>.pb.gz?range=5m), with the names the agent gave them.
perf's are read with `perf script`. The denominator is every sample of the workload process;
a few land legitimately outside leaf (main reading the clock), the same for every profiler.
"""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import time
import urllib.request

from bench.common import Agent, log, table, wait_sampling, wait_until
from bench.workloads import BUILDS, CHAIN, Workload, build_chain, work_dir

NAME = "fidelity"
DEFAULT_DURATION = 30.0
LEAF_FIRST = list(reversed(CHAIN))  # leaf, middle, outer, main: innermost first


def add_arguments(parser) -> None:
    parser.add_argument("--duration", type=float, default=DEFAULT_DURATION,
                        help="seconds the workload runs under each profiler (default %(default)s)")


def full_chain(names_leaf_first: list[str]) -> bool:
    """True when leaf, middle, outer, main follow one another (kernel frames may sit on top)."""
    n = len(LEAF_FIRST)
    return any(names_leaf_first[i:i + n] == LEAF_FIRST
               for i in range(len(names_leaf_first) - n + 1))


def pprof_shares(blob: bytes) -> tuple[int, int]:
    """(samples with the full chain, all samples) of a gzipped pprof profile."""
    from services.proto_gen.pprof import profile_pb2

    profile = profile_pb2.Profile()
    profile.ParseFromString(gzip.decompress(blob))
    strings = profile.string_table
    function_names = {f.id: strings[f.name] for f in profile.function}
    # A location's lines run from the innermost inlined function outwards.
    location_names = {loc.id: [function_names.get(line.function_id, "") for line in loc.line]
                      for loc in profile.location}
    index = next((i for i, t in enumerate(profile.sample_type) if strings[t.type] == "samples"), 0)
    full = total = 0
    for sample in profile.sample:
        names = [name for lid in sample.location_id for name in location_names.get(lid, [""])]
        count = sample.value[index]
        total += count
        if full_chain(names):
            full += count
    return full, total


def perf_script_shares(text: str, pid: int) -> tuple[int, int]:
    """(samples with the full chain, all samples of ``pid``) from `perf script` output."""
    full = total = 0
    header, names = None, []

    def finish():
        nonlocal full, total
        if header is not None and f" {pid} " in f" {header} ":
            total += 1
            full += full_chain(names)

    for line in text.splitlines():
        if not line.strip():
            finish()
            header, names = None, []
        elif not line[0].isspace():
            finish()
            header, names = line, []
        else:
            # "\t    55d1c1a0116d leaf+0x1d (/tmp/x/chain_fp)": address, symbol+offset, object
            parts = line.strip().split(" ", 1)
            symbol = parts[1].rsplit(" (", 1)[0] if len(parts) > 1 else ""
            names.append(symbol.split("+0x", 1)[0])
    finish()
    return full, total


def agent_run(binary: str, duration: float) -> tuple[int, int]:
    agent = Agent(duration="5s")
    try:
        wait_sampling(agent)
        workload = Workload(binary, chains=1, pythons=0).start(duration)
        pid = workload.pids()[0]
        workload.wait(duration + 60)
        ended = time.time()
        def mine(labels: dict) -> bool:
            return labels.get("pid") == str(pid)

        # The window holding the workload's end closes 5 s + 1.5 s grace later.
        target = agent.wait_for_profile(mine, after=ended - 0.5, seconds=30) or \
            wait_until(lambda: next((t for t in agent.targets() if mine(t["labels"])), None), 5)
        if not target:
            raise RuntimeError(f"the agent shows no profile of pid {pid}:\n{agent.log()}")
        span = "5m" if duration < 280 else "10m"
        with urllib.request.urlopen(f"{agent.url}{target['profile_url']}?range={span}",
                                    timeout=60) as r:
            return pprof_shares(r.read())
    finally:
        agent.terminate(timeout=30)
        agent.cleanup()


def perf_run(binary: str, duration: float, call_graph: str, directory: str) -> tuple[int, int]:
    data = os.path.join(directory, f"perf-{call_graph}.data")
    proc = subprocess.run(["perf", "record", "-F", "100", "--call-graph", call_graph, "-o", data,
                           "--", binary, f"{duration:g}"], capture_output=True, text=True,
                          timeout=duration + 120)
    if proc.returncode != 0:
        raise RuntimeError(f"perf record failed: {proc.stderr[-500:]}")
    pid = None
    script = subprocess.run(["perf", "script", "-i", data], capture_output=True, text=True,
                            timeout=600)
    # The workload is perf's only child: its pid is the one in every sample's header.
    for line in script.stdout.splitlines():
        if line and not line[0].isspace():
            fields = line.split()
            pid = next((int(f) for f in fields[1:3] if f.isdigit()), None)
            if pid:
                break
    return perf_script_shares(script.stdout, pid) if pid else (0, 0)


def run(args) -> dict:
    directory = work_dir()
    results = []
    try:
        for build in BUILDS:
            binary = build_chain(directory, build)
            for profiler, measure in (
                    ("agent", lambda: agent_run(binary, args.duration)),
                    ("perf -g", lambda: perf_run(binary, args.duration, "fp", directory)),
                    ("perf --call-graph dwarf",
                     lambda: perf_run(binary, args.duration, "dwarf", directory))):
                log(f"fidelity: {build} build, {profiler}")
                try:
                    full, total = measure()
                    results.append({"build": build, "profiler": profiler, "samples": total,
                                    "full_chain": full,
                                    "share": round(full / total, 4) if total else None})
                except Exception as e:  # the other profilers' figures still stand
                    log(f"fidelity: {profiler} on {build} failed: {e}")
                    results.append({"build": build, "profiler": profiler,
                                    "error": str(e)[:300]})
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    print(table(["build", "profiler", "samples", "full chain", "share"],
                [[r["build"], r["profiler"], r.get("samples"), r.get("full_chain"),
                  r.get("share")] for r in results]))
    return {"args": {"duration": args.duration}, "short": args.duration < DEFAULT_DURATION,
            "builds": {b: " ".join(f) for b, f in BUILDS.items()}, "results": results}
