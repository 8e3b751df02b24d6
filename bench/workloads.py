"""The workloads the benchmarks profile: bench/chain_workload.c built with and without frame
pointers, and bench/busy.py. Each runs for a given time and reports its own throughput."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
CHAIN_SOURCE = HERE / "chain_workload.c"
BUSY_SOURCE = HERE / "busy.py"
CHAIN = ["main", "outer", "middle", "leaf"]

# -fno-inline and no sibling calls keep every function of the chain a real frame.
COMMON_FLAGS = ["-O2", "-g", "-fno-inline", "-fno-optimize-sibling-calls"]
BUILDS = {
    "fp": COMMON_FLAGS + ["-fno-omit-frame-pointer", "-mno-omit-leaf-frame-pointer"],
    "nofp": COMMON_FLAGS + ["-fomit-frame-pointer"],
}


def build_chain(directory: str, build: str = "fp") -> str:
    """Compile the chain workload into ``directory`` (made readable: the agent's unprivileged
    aggregator opens the binary to name its frames)."""
    os.makedirs(directory, exist_ok=True)
    os.chmod(directory, 0o755)
    out = os.path.join(directory, f"chain_{build}")
    subprocess.run(["gcc", *BUILDS[build], "-o", out, str(CHAIN_SOURCE)], check=True,
                   capture_output=True, timeout=120)
    return out


def work_dir() -> str:
    """A world-traversable temporary directory (the agent's services run unprivileged)."""
    path = tempfile.mkdtemp(prefix="parca-bench-", dir="/tmp")
    os.chmod(path, 0o755)
    return path


@dataclass
class Run:
    kind: str
    proc: subprocess.Popen


class Workload:
    """``chains`` C chain processes and ``pythons`` busy.py processes, started together."""

    def __init__(self, chain_binary: str, chains: int = 2, pythons: int = 1):
        self.chain_binary = chain_binary
        self.chains = chains
        self.pythons = pythons
        self.runs: list[Run] = []

    def start(self, seconds: float) -> "Workload":
        arg = f"{seconds:g}"
        for _ in range(self.chains):
            self.runs.append(Run("c", subprocess.Popen([self.chain_binary, arg],
                                                       stdout=subprocess.PIPE, text=True)))
        for _ in range(self.pythons):
            # One address layout and hash seed for every run: with ASLR, busy.py's iterations
            # per CPU second alone move between about 770 and 1,220 from one start to the next
            # (measured here); with both fixed, within a few percent.
            self.runs.append(Run("python", subprocess.Popen(
                ["setarch", "-R", sys.executable, str(BUSY_SOURCE), arg], stdout=subprocess.PIPE,
                text=True, env={**os.environ, "PYTHONHASHSEED": "0"})))
        return self

    def pids(self, kind: str | None = None) -> list[int]:
        return [r.proc.pid for r in self.runs if kind is None or r.kind == kind]

    def stop(self) -> None:
        """Ask every process to finish now (SIGTERM: it still prints its count)."""
        for r in self.runs:
            if r.proc.poll() is None:
                r.proc.terminate()

    def wait(self, timeout: float) -> dict[str, float]:
        """Iterations per second, summed per kind: {"c": ..., "python": ...}. ``self.totals``
        then holds, per kind, the iterations, wall seconds and CPU seconds of its processes
        (summed)."""
        rates: dict[str, float] = {}
        self.totals: dict[str, dict[str, float]] = {}
        for r in self.runs:
            out, _ = r.proc.communicate(timeout=timeout)
            m = re.search(r"iterations=(\d+) seconds=([\d.]+)(?: cpu=([\d.]+))?", out or "")
            if not m:
                raise RuntimeError(f"{r.kind} workload printed no count: {out!r}")
            iterations, seconds = int(m.group(1)), float(m.group(2))
            rates[r.kind] = rates.get(r.kind, 0.0) + iterations / seconds
            total = self.totals.setdefault(r.kind, {"iterations": 0, "seconds": 0.0, "cpu": 0.0})
            total["iterations"] += iterations
            total["seconds"] += seconds
            total["cpu"] += float(m.group(3) or "nan")
        return rates

    def kill(self) -> None:
        for r in self.runs:
            if r.proc.poll() is None:
                r.proc.kill()
                r.proc.wait(5)
