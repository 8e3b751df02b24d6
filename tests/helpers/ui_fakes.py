"""Not tests: the fake pipeline the UI tests share (real pprofs, real PUB sockets, the UI process).

The UI's sources are PUB sockets it connects to; a test binds them itself at the real endpoint
paths in a temporary run directory and publishes real `profile` and heartbeat messages, so the
UI under test runs exactly as under supervisord.
"""

from __future__ import annotations

import gzip
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import zmq

import services.proto_gen  # noqa: F401
from pprof import profile_pb2  # noqa: E402
from services import runtime, wire  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
CHAIN = ("main", "outer", "middle", "leaf")  # outermost first, as the C workload calls them


def make_pprof(stacks: dict[tuple[str, ...], int], time_ns: int | None = None,
               duration_ns: int = 10_000_000_000) -> bytes:
    """A gzipped pprof of sample counts per stack (stacks outermost first), as the aggregator
    builds them: samples/count and cpu/nanoseconds, one location per function."""
    p = profile_pb2.Profile()
    strings = {"": 0}
    p.string_table.append("")

    def s(text: str) -> int:
        if text not in strings:
            strings[text] = len(p.string_table)
            p.string_table.append(text)
        return strings[text]

    p.sample_type.add(type=s("samples"), unit=s("count"))
    p.sample_type.add(type=s("cpu"), unit=s("nanoseconds"))
    p.period_type.type, p.period_type.unit = s("cpu"), s("nanoseconds")
    p.period = 10_000_000
    p.time_nanos = time_ns if time_ns is not None else time.time_ns() - duration_ns
    p.duration_nanos = duration_ns
    p.mapping.add(id=1, memory_start=0x400000, memory_limit=0x500000, filename=s("/usr/bin/chain"),
                  has_functions=True)
    locations: dict[str, int] = {}
    for stack, count in stacks.items():
        for name in stack:
            if name not in locations:
                fid = len(locations) + 1
                p.function.add(id=fid, name=s(name), system_name=s(name),
                               filename=s("chain.c"))
                loc = p.location.add(id=fid, mapping_id=1, address=0x401000 + 0x10 * fid)
                loc.line.add(function_id=fid, line=10 * fid)
                locations[name] = fid
        p.sample.add(location_id=[locations[n] for n in reversed(stack)],
                     value=[count, count * p.period])
    return gzip.compress(p.SerializeToString())


def chain_pprof(scale: int = 1) -> bytes:
    return make_pprof({CHAIN: 90 * scale, CHAIN[:3]: 7 * scale, CHAIN[:2]: 3 * scale})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakePipeline:
    """PUB sockets at the aggregator's, collector's, discovery's and shipper's endpoints.

    ``targets`` maps a name to (labels, pprof bytes); a thread publishes each target's profile
    every ``period`` seconds and heartbeats of the four services, until ``close``."""

    def __init__(self, run_dir: str, period: float = 0.5):
        self.ctx = zmq.Context()
        self.metrics = runtime.Metrics("fake")
        self.period = period
        self.targets: dict[str, tuple[dict[str, str], bytes]] = {}
        self.sockets = {}
        self.publishers = {}
        for service, endpoint in (("aggregator", wire.ENDPOINT_AGGREGATOR),
                                  ("collector", wire.ENDPOINT_COLLECTOR),
                                  ("discovery", wire.ENDPOINT_DISCOVERY),
                                  ("shipper", wire.ENDPOINT_SHIPPER_PUB)):
            self.sockets[service] = runtime.pub_socket(self.ctx, [wire.endpoint(run_dir, endpoint)])
            self.publishers[service] = wire.Publisher(service)
        self.samples_total = 0
        self.sent = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def set_target(self, name: str, labels: dict[str, str], pprof: bytes) -> None:
        with self._lock:
            self.targets[name] = (labels, pprof)

    def send_raw(self, service: str, frames: list[bytes]) -> None:
        with self._lock:
            self.sockets[service].send_multipart(frames)

    def _heartbeat_metrics(self, service: str) -> list:
        if service == "collector":
            return [["parca_agent_collector_samples_total", {}, self.samples_total],
                    ["parca_agent_collector_stack_errors_total",
                     {"kind": "user_stack_collisions"}, 3],
                    ["parca_agent_collector_messages_dropped_total", {"socket": "collector"}, 2]]
        if service == "aggregator":
            return [["parca_agent_aggregator_profiles_built_total", {}, self.sent]]
        if service == "shipper":
            return [["parca_agent_shipper_spool_bytes", {}, 1234.0]]
        return [["parca_agent_discovery_targets", {}, float(len(self.targets))]]

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.time_ns()
            with self._lock:
                # As the aggregator does: a window's profiles in one `profiles` message.
                bodies = []
                for labels, pprof in self.targets.values():
                    bodies.append({"id": f"p{self.sent}", "labels": labels,
                                   "start_ns": now - 10_000_000_000, "end_ns": now,
                                   "pprof": pprof, "samples": 100})
                    self.sent += 1
                if bodies:
                    self.sockets["aggregator"].send_multipart(self.publishers["aggregator"].encode(
                        "profiles", {"id": f"b{self.sent}", "profiles": bodies}))
                self.samples_total += 100
                for service, sock in self.sockets.items():
                    body = {"service": service, "pid": 1000 + len(service), "started": 1.0,
                            "metrics": self._heartbeat_metrics(service)}
                    sock.send_multipart(self.publishers[service].encode("heartbeat", body))
            self._stop.wait(self.period)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for sock in self.sockets.values():
            sock.close(linger=0)
        self.ctx.term()


class UIProcess:
    """``python -m services.ui`` on a free port of 127.0.0.1, reading the given run directory."""

    def __init__(self, run_dir: str, **env: str):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        environ = dict(os.environ, PARCA_AGENT_RUN_DIR=run_dir,
                       PARCA_AGENT_HTTP_ADDRESS=f"127.0.0.1:{self.port}",
                       PARCA_AGENT_LOG_LEVEL="info", PYTHONPATH=str(REPO))
        environ.update(env)
        self.stderr_path = Path(run_dir) / "ui.stderr"
        self._stderr = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "services.ui"], cwd=REPO, env=environ,
                                     stdout=subprocess.DEVNULL, stderr=self._stderr)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the UI exited: {self.stderr_path.read_text()}")
            try:
                if self.get("/healthz")[0] == 200:
                    return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("the UI did not answer /healthz within 20 s")

    def get(self, path: str, timeout: float = 30) -> tuple[int, dict[str, str], bytes]:
        try:
            with urllib.request.urlopen(self.base + path, timeout=timeout) as r:
                return r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._stderr.close()
        return self.proc.returncode


CHAIN_LABELS = {"__name__": "parca_agent_cpu", "node": "test-node", "comm": "chain",
                "pid": "4242", "executable": "/usr/bin/chain"}
EVIL = "<img src=x onerror=alert(1)>"
EVIL_LABELS = {"__name__": "parca_agent_cpu", "node": "test-node", "comm": EVIL, "pid": "666"}


@contextmanager
def running_ui(run_dir: str, **env: str):
    """The UI fed by a FakePipeline with the chain workload's target and a hostile one; yields
    (ui, pipeline) once the UI lists both targets."""
    pipeline = FakePipeline(run_dir)
    pipeline.set_target("chain", CHAIN_LABELS, chain_pprof())
    pipeline.set_target("evil", EVIL_LABELS, make_pprof({("main", "<script>alert(2)</script>"): 5}))
    ui = None
    try:
        ui = UIProcess(run_dir, **env)
        # Wait for both targets and a few windows of history, so ranges have something to merge.
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            targets = json.loads(ui.get("/api/targets")[2])["targets"]
            if len(targets) >= 2:
                view = json.loads(ui.get(f"/api/flamegraph/{targets[0]['id']}?range=1m")[2])
                if view["windows"] >= 3:
                    break
            time.sleep(0.2)
        else:
            raise RuntimeError("the UI did not list the published targets within 20 s")
        yield ui, pipeline
    finally:
        if ui is not None:
            ui.stop()
        pipeline.close()
