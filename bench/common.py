"""What every benchmark shares: /proc accounting, the machine's description, results on disk,
printing, and the agent started as a real subprocess (the end-to-end tests' helper)."""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "bench" / "results"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# One helper starts `parca-agent` for the tests and the benchmarks alike: a world-traversable
# temporary run directory (the unprivileged services must reach it), a free port, its logs.
from tests.helpers.agent import Agent  # noqa: E402
from tests.helpers.services import wait_until  # noqa: E402

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


# --- /proc ------------------------------------------------------------------------------------

def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            text = fh.read()
    except OSError:
        return None
    # comm may hold spaces and parentheses: the fields start after the last ')'.
    return text[text.rindex(")") + 2:].split()


def cpu_seconds(pids) -> float:
    """utime+stime of the processes plus what their reaped children used (cutime+cstime): a
    child that exits mid-run moves its time into its parent's and is still counted once."""
    total = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields:
            # fields[0] is field 3 (state): utime, stime, cutime, cstime are fields 14-17.
            total += sum(int(x) for x in fields[11:15])
    return total / CLOCK_TICKS


def cpu_seconds_precise(pids) -> float:
    """CPU time of the processes' live threads in nanoseconds' resolution (schedstat), for
    windows where clock ticks are too coarse: perf uses a few ticks a minute. Time of threads
    or children that ended is not in it: use cpu_seconds for whole runs."""
    total = 0
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as fh:
                    total += int(fh.read().split()[0])
            except (OSError, ValueError, IndexError):
                pass
    return total / 1e9


def status_mb(pid: int, key: str = "VmHWM") -> float | None:
    """A size from /proc/<pid>/status in MB (VmHWM: peak resident set; VmRSS: current)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def agent_pids(agent: Agent) -> list[int]:
    """Every process of the agent: `parca-agent` itself (its environment has no run directory:
    the flag carries it) and every process it started (supervisord and the services)."""
    return sorted(set(agent.descendants()) | {agent.proc.pid})


def agent_processes(agent: Agent) -> dict[str, int]:
    """The agent's processes by name: the five services, supervisord, and parca-agent."""
    named = dict(agent.service_pids())
    named["parca-agent"] = agent.proc.pid
    for pid in agent.descendants():
        try:
            with open(f"/proc/{pid}/comm") as fh:
                comm = fh.read().strip()
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                cmdline = fh.read()
        except OSError:
            continue
        if b"supervisord" in cmdline or comm == "supervisord":
            named["supervisord"] = pid
    return named


def agent_metrics(agent: Agent) -> dict[str, float]:
    """The agent's /metrics, every series summed over its labels, by name."""
    try:
        with urllib.request.urlopen(agent.url + "/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return {}
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)", line)
        if m:
            try:
                out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(3))
            except ValueError:
                pass
    return out


def wait_sampling(agent: Agent, seconds: float = 90) -> float:
    """Wait until the collector has drained samples (BPF loaded, events attached); the time it
    took. Raises with the agent's log when it does not come up."""
    started = time.monotonic()
    ok = wait_until(lambda: agent_metrics(agent).get("parca_agent_collector_samples_total", 0) > 0,
                    seconds, interval=0.3)
    if not ok:
        raise RuntimeError(f"the agent did not start sampling within {seconds}s:\n{agent.log()}")
    return time.monotonic() - started


def perf_event_fds(pid: int) -> int:
    """How many perf events a process holds open: bcc's tool has attached once it holds one
    per CPU (it prints its banner before it compiles, so its output cannot say)."""
    n = 0
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:[perf_event]":
                    n += 1
            except OSError:
                pass
    except OSError:
        pass
    return n


# --- the machine --------------------------------------------------------------------------------

def machine_info() -> dict:
    model = ""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as fh:
            mem_kb = int(fh.readline().split()[1])
    except OSError:
        mem_kb = 0
    return {"nproc": os.cpu_count(), "memory_gb": round(mem_kb / 1024 / 1024, 1),
            "cpu": model, "kernel": platform.release(), "python": platform.python_version(),
            "loadavg_at_start": os.getloadavg()[0]}


# --- results ------------------------------------------------------------------------------------

def ratio(a, b, digits: int = 2):
    """a / b rounded, or None when either is missing or b is 0."""
    return round(a / b, digits) if a is not None and b else None


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def save(name: str, result: dict, short: bool) -> Path:
    """Write bench/results/<name>.json with the machine and date; print its JSON line."""
    record = {"name": name, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
              "machine": machine_info(), "short": short, **result}
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(record, indent=1, sort_keys=False) + "\n")
    print(json.dumps(record, sort_keys=False))
    return path


def load_results() -> dict[str, dict]:
    out = {}
    if RESULTS_DIR.is_dir():
        for path in sorted(RESULTS_DIR.glob("*.json")):
            try:
                out[path.stem] = json.loads(path.read_text())
            except ValueError:
                continue
    return out


def fmt(value, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        if value != 0 and abs(value) < 10 ** -digits:
            return f"{value:.2e}"
        return f"{value:.{digits}f}".rstrip("0").rstrip(".") if "." in f"{value:.{digits}f}" \
            else f"{value:.{digits}f}"
    return str(value)


def table(header: list[str], rows: list[list]) -> str:
    """A plain-text table for the terminal (docs/benchmarks.md gets Markdown from report.py)."""
    cells = [header] + [[fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)
