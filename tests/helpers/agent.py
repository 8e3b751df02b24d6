"""`parca-agent` as a real subprocess: supervisord and its five services, read over HTTP."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.request
from contextlib import contextmanager

from tests.helpers.services import ROOT, free_port, wait_until

PARCA_AGENT = os.path.join(os.path.dirname(os.path.realpath(__file__)), "..", "..", ".venv",
                           "bin", "parca-agent")


def bpf_program_ids(pid: int) -> set[int]:
    """The ids of the BPF programs a process holds open (from /proc/<pid>/fdinfo)."""
    ids = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fdinfo")
    except OSError:
        return ids
    for fd in fds:
        try:
            with open(f"/proc/{pid}/fdinfo/{fd}") as fh:
                for line in fh:
                    if line.startswith("prog_id:"):
                        ids.add(int(line.split()[1]))
        except OSError:
            continue
    return ids


def bpf_program_loaded(prog_id: int) -> bool:
    """Whether the kernel still holds this program (bpftool exits non-zero for an unknown id)."""
    return subprocess.run(["bpftool", "prog", "show", "id", str(prog_id)], capture_output=True,
                          timeout=30).returncode == 0


class Agent:
    def __init__(self, *flags: str, duration: str = "3s"):
        # The unprivileged services must reach the run and cache directories: pytest's own
        # temporary folders are private to root, so use a world-traversable one.
        self.base = tempfile.mkdtemp(prefix="parca-agent-e2e-", dir="/tmp")
        os.chmod(self.base, 0o755)
        self.run_dir = os.path.join(self.base, "run")
        self.cache_dir = os.path.join(self.base, "cache")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = os.path.join(self.base, "agent.log")
        env = {k: v for k, v in os.environ.items() if not k.startswith("PARCA_AGENT_")}
        self.proc = subprocess.Popen(
            [PARCA_AGENT, f"--http-address=127.0.0.1:{self.port}", "--kubernetes=false",
             f"--run-dir={self.run_dir}", f"--cache-dir={self.cache_dir}",
             f"--profiling-duration={duration}", *flags],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True)
        self._log = open(self.log_path, "wb")
        self._reader = threading.Thread(target=self._copy_log, daemon=True)
        self._reader.start()

    def _copy_log(self):
        for line in self.proc.stdout:
            self._log.write(line)
            self._log.flush()

    def log(self) -> str:
        with open(self.log_path, "rb") as fh:
            return fh.read().decode("utf-8", "replace")[-6000:]

    def get_json(self, path: str, timeout: float = 5):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return json.load(r)

    def targets(self) -> list[dict]:
        try:
            return self.get_json("/api/targets")["targets"]
        except OSError:
            return []

    def wait_for_profile(self, match, after: float = 0.0, seconds: float = 60) -> dict | None:
        """The first target matching ``match(labels)`` whose latest profile ended after ``after``."""
        def found():
            for t in self.targets():
                if match(t["labels"]) and (t["last_profile_time"] or 0) > after:
                    return t
            return None
        return wait_until(found, seconds, interval=0.5)

    def service_pids(self) -> dict[str, int]:
        """The running services, by name, from their command lines."""
        pids = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as fh:
                    args = fh.read().split(b"\0")
                with open(f"/proc/{entry}/environ", "rb") as fh:
                    environ = fh.read()
            except OSError:
                continue
            if b"-m" in args and self.run_dir.encode() in environ:
                i = args.index(b"-m")
                name = args[i + 1].decode() if i + 1 < len(args) else ""
                # services.collector.loader is the collector's short-lived compiling child.
                if name.startswith("services.") and name.count(".") == 1:
                    pids[name[len("services."):]] = int(entry)
        return pids

    def collector_programs(self) -> set[int]:
        """Ids of the BPF programs the running collector holds."""
        pid = self.service_pids().get("collector")
        return bpf_program_ids(pid) if pid else set()

    def descendants(self) -> list[int]:
        """Every process started by this agent (they carry its run directory in the environment)."""
        out = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/environ", "rb") as fh:
                        if f"PARCA_AGENT_RUN_DIR={self.run_dir}".encode() in fh.read():
                            out.append(int(entry))
                except OSError:
                    pass
        return out

    def terminate(self, timeout: float = 10) -> tuple[int, float]:
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
            raise AssertionError(f"parca-agent did not stop within {timeout}s:\n{self.log()}")
        return code, time.monotonic() - started

    def cleanup(self):
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(5)
        for pid in self.descendants():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.base, ignore_errors=True)


@contextmanager
def running_agent(*flags: str, duration: str = "3s"):
    """An Agent for a test module, where BPF can run."""
    from tests.conftest import check_bpf

    check_bpf()
    agent = Agent(*flags, duration=duration)
    try:
        yield agent
    finally:
        agent.cleanup()
