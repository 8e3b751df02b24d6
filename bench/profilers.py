"""The profilers the overhead benchmark compares, behind one small interface: start and wait
until sampling, CPU used so far, stop and report the CPU of the whole run."""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import threading
import time

from bench.common import Agent, agent_pids, agent_processes, cpu_seconds, cpu_seconds_precise, log, \
    perf_event_fds, wait_sampling, wait_until

FREQUENCY = 100
SETTLE_MIN_S = 3.0
SETTLE_MAX_S = 40.0
SETTLED_CPU_PER_S = 0.015  # below this over SETTLE_STEP_S, start-up work is done
SETTLE_STEP_S = 2.0


def _settle(cpu) -> float:
    """Wait until ``cpu()`` grows by less than SETTLED_CPU_PER_S over a step; the time taken."""
    started = time.monotonic()
    time.sleep(SETTLE_MIN_S)
    last = cpu()
    while time.monotonic() - started < SETTLE_MAX_S:
        time.sleep(SETTLE_STEP_S)
        now = cpu()
        if (now - last) / SETTLE_STEP_S < SETTLED_CPU_PER_S:
            break
        last = now
    return round(time.monotonic() - started, 1)


def _wait4_cpu(proc: subprocess.Popen, timeout: float) -> float:
    """Reap ``proc`` and return all the CPU it used, from its rusage (children included)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return usage.ru_utime + usage.ru_stime
        time.sleep(0.05)
    proc.kill()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    raise RuntimeError(f"{proc.args[0]} did not finish within {timeout}s")


class NoProfiler:
    name = "none"
    note = ""

    def start(self, duration: float, work_dir: str) -> None:
        pass

    def cpu(self) -> float:
        """CPU time so far, fine-grained, for the window the workload runs in."""
        return 0.0

    def stop(self) -> float:
        return 0.0

    def cleanup(self) -> None:
        pass


class AgentProfiler:
    """`parca-agent` with its defaults (100 Hz, 10 s windows), no Kubernetes, a free port."""

    name = "agent"
    note = "all of its processes: parca-agent, supervisord and the five services"

    def __init__(self, profiling_duration: str = "10s", cache_dir: str | None = None):
        """cache_dir: one cache directory for every start (as a host's agent keeps across
        restarts), else each start gets an empty one."""
        self.profiling_duration = profiling_duration
        self.cache_dir = cache_dir
        self.agent: Agent | None = None

    def start(self, duration: float, work_dir: str) -> None:
        flags = [f"--cache-dir={self.cache_dir}"] if self.cache_dir else []
        self.agent = Agent(*flags, duration=self.profiling_duration)
        self.startup_s = wait_sampling(self.agent)
        # Its start-up goes on after sampling begins: the services' first process scans, and
        # the collector building unwind tables for every process already running (seconds of
        # CPU on a busy host). That is reported in "total", not as the steady state: wait
        # until the agent's CPU use has come down (or SETTLE_MAX_S has passed).
        self.settle_s = _settle(lambda: cpu_seconds_precise(agent_pids(self.agent)))

    def cpu(self) -> float:
        return cpu_seconds_precise(agent_pids(self.agent))

    def cpu_by_service(self) -> dict[str, float]:
        """The same, by process: the five services, supervisord and parca-agent."""
        return {name: cpu_seconds_precise([pid])
                for name, pid in agent_processes(self.agent).items()}

    def stop(self) -> float:
        total = cpu_seconds(agent_pids(self.agent))
        code, _ = self.agent.terminate(timeout=30)
        if code != 0:
            log(f"parca-agent exited with {code}")
        return total

    def cleanup(self) -> None:
        if self.agent:
            self.agent.cleanup()
            self.agent = None


class PerfProfiler:
    name = "perf"
    note = "perf record -F 100 -a -g -o <file>; total includes writing build ids at exit"

    def __init__(self):
        self.proc: subprocess.Popen | None = None

    def start(self, duration: float, work_dir: str) -> None:
        self.output = os.path.join(work_dir, "perf.data")
        self.log = open(os.path.join(work_dir, "perf.log"), "wb")
        self.proc = subprocess.Popen(
            ["perf", "record", "-F", str(FREQUENCY), "-a", "-g", "-o", self.output],
            stdout=self.log, stderr=subprocess.STDOUT)
        # perf writes the file's header once its events are open.
        if not wait_until(lambda: os.path.exists(self.output) and os.path.getsize(self.output),
                          30, interval=0.1):
            raise RuntimeError("perf record did not start")
        time.sleep(0.5)

    def cpu(self) -> float:
        return cpu_seconds_precise([self.proc.pid])

    def stop(self) -> float:
        self.proc.send_signal(signal.SIGINT)
        total = _wait4_cpu(self.proc, 120)
        self.output_mb = round(os.path.getsize(self.output) / 1e6, 1)
        return total

    def cleanup(self) -> None:
        if self.proc and self.proc.returncode is None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None


class PerfWindowsProfiler:
    """perf producing what the agent produces: a recording every window (10 s), i.e. `perf
    record` run back to back for one window each. Each run pays perf's start (synthesizing
    every process's maps) and exit (build ids) that the 60 s run pays once. Other window
    lengths give other anchors (the load bench also runs 60 s pieces: the overhead bench's
    perf run, repeated)."""

    def __init__(self, window: float = 10.0):
        self.window = window
        self.name = f"perf-{window:g}s"
        self.note = (f"perf record -F 100 -a -g -o <file> -- sleep {window:g}, back to back: "
                     f"one recording per {window:g} s"
                     + (" window, the agent's output cadence" if window == 10.0 else "")
                     + "; cpu/s and total both count every run")
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._done_cpu = 0.0
        self._live: subprocess.Popen | None = None

    def start(self, duration: float, work_dir: str) -> None:
        self.work_dir = work_dir
        self._stopping.clear()
        self._done_cpu = 0.0
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        if not wait_until(lambda: self._live is not None, 30, interval=0.05):
            raise RuntimeError("perf record did not start")

    def _loop(self) -> None:
        n = 0
        while not self._stopping.is_set():
            out = os.path.join(self.work_dir, f"perf-{n % 2}.data")
            proc = subprocess.Popen(
                ["perf", "record", "-q", "-F", str(FREQUENCY), "-a", "-g", "-o", out, "--",
                 "sleep", f"{self.window:g}"], stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL)
            with self._lock:
                self._live = proc
            cpu = _wait4_cpu(proc, self.window + 120)
            with self._lock:
                self._done_cpu += cpu
                self._live = None
            n += 1

    def cpu(self) -> float:
        with self._lock:
            live = [self._live.pid] if self._live is not None else []
            return self._done_cpu + cpu_seconds_precise(live)

    def stop(self) -> float:
        self._stopping.set()
        with self._lock:
            if self._live is not None and self._live.poll() is None:
                # The run in progress ends now, as perf does on Ctrl-C (its exit work included),
                # so the total covers the same time as the other profilers'.
                self._live.send_signal(signal.SIGINT)
        if self._thread is not None:
            self._thread.join(150)
        return self._done_cpu

    def cleanup(self) -> None:
        self._stopping.set()
        with self._lock:
            if self._live is not None and self._live.poll() is None:
                self._live.kill()
        self._thread = None


class BccProfiler:
    name = "bcc"
    note = ("profile-bpfcc -F 100 <duration>, stacks printed to a file at the end; "
            "total includes compiling its BPF program and printing")

    def __init__(self):
        self.proc: subprocess.Popen | None = None

    @staticmethod
    def available() -> bool:
        return shutil.which("profile-bpfcc") is not None

    def start(self, duration: float, work_dir: str) -> None:
        self.out = open(os.path.join(work_dir, "bcc-profile.txt"), "wb")
        self.proc = subprocess.Popen(
            ["profile-bpfcc", "-F", str(FREQUENCY), str(math.ceil(duration))],
            stdout=self.out, stderr=subprocess.STDOUT)
        # It sleeps for the duration once attached: one perf event per CPU means attached.
        cpus = os.cpu_count() or 1
        if not wait_until(lambda: perf_event_fds(self.proc.pid) >= cpus or self.proc.poll()
                          is not None, 120, interval=0.05) or self.proc.poll() is not None:
            raise RuntimeError("profile-bpfcc did not attach")

    def cpu(self) -> float:
        return cpu_seconds_precise([self.proc.pid])

    def stop(self) -> float:
        return _wait4_cpu(self.proc, 300)

    def cleanup(self) -> None:
        if self.proc and self.proc.returncode is None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None


def all_profilers(agent_cache_dir: str | None = None) -> list:
    profilers = [NoProfiler(), AgentProfiler(cache_dir=agent_cache_dir), PerfProfiler(),
                 PerfWindowsProfiler()]
    if BccProfiler.available():
        profilers.append(BccProfiler())
    else:
        log("profile-bpfcc not found (Debian's bpfcc-tools): bcc left out")
    return profilers


__all__ = ["all_profilers", "AgentProfiler", "PerfProfiler", "PerfWindowsProfiler",
           "BccProfiler", "NoProfiler"]
