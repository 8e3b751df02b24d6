"""Start the agent's services as real subprocesses and read their real sockets."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import zmq

from services import runtime, wire

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def service_env(run_dir: str, cache_dir: str, **settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PARCA_AGENT_")}
    env["PARCA_AGENT_RUN_DIR"] = run_dir
    env["PARCA_AGENT_CACHE_DIR"] = cache_dir
    env["PARCA_AGENT_KUBERNETES"] = "false"
    for key, value in settings.items():
        env["PARCA_AGENT_" + key.upper()] = str(value)
    return env


def start_service(name: str, env: dict[str, str], log_path: str | None = None) -> subprocess.Popen:
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL
    return subprocess.Popen([PYTHON, "-m", f"services.{name}"], cwd=ROOT, env=env,
                            stdout=out, stderr=subprocess.STDOUT)


def stop(proc: subprocess.Popen, timeout: float = 10) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
            raise AssertionError(f"{proc.args} did not stop within {timeout}s of SIGTERM")
    return proc.returncode


class Subscriber:
    """A SUB socket on one of the agent's endpoints that decodes with the wire module."""

    def __init__(self, run_dir: str, endpoint_name: str, topics: list[bytes]):
        self.ctx = zmq.Context()
        self.sock = runtime.sub_socket(self.ctx, [wire.endpoint(run_dir, endpoint_name)], topics)

    def messages(self, seconds: float):
        """Yield messages for up to ``seconds``."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.sock.poll(100):
                yield wire.decode(self.sock.recv_multipart())

    def wait_for(self, predicate, seconds: float):
        for msg in self.messages(seconds):
            if predicate(msg):
                return msg
        return None

    def close(self):
        self.ctx.destroy(linger=0)


def wait_until(predicate, seconds: float, interval: float = 0.1):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return None
