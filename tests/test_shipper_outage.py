"""Losing nothing: a store outage, a kill -9 of the shipper during one, and SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from services.profile_channel import ProfileSender
from tests.helpers.store_server import (FakeStore, ShipperThread, profile_body, send_acked,
                                        wait_until)

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_store_down_then_up_every_profile_arrives_exactly_once(tmp_path):
    store = FakeStore(port=free_port())  # not started: the store is down
    bodies = [profile_body(n) for n in range(12)]
    with ShipperThread(tmp_path, store.address, env={"PARCA_AGENT_INSECURE": "true"}) as sh:
        sender = sh.sender()
        send_acked(sender, bodies[:6])
        assert wait_until(lambda: sh.metric("ship_failures_total", code="UNAVAILABLE") >= 3)
        send_acked(sender, bodies[6:])  # windows keep coming during the outage
        assert sh.metric("spool_files") == 12
        store.start()
        try:
            assert wait_until(lambda: len(store.raw_profiles()) >= 12)
            wait_until(lambda: False, 0.5)  # time for a duplicate to show up, if any
            arrived = Counter(raw for _, raw in store.raw_profiles())
        finally:
            store.stop()
    assert arrived == Counter(b["pprof"] for b in bodies)


def shipper_process(tmp_path: Path, store_address: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT),
           "PARCA_AGENT_RUN_DIR": str(tmp_path / "run"),
           "PARCA_AGENT_CACHE_DIR": str(tmp_path / "cache"),
           "PARCA_AGENT_STORE_ADDRESS": store_address,
           "PARCA_AGENT_INSECURE": "true",
           "PARCA_AGENT_DEBUGINFO_UPLOAD": "false",
           "PARCA_AGENT_NODE": "test-node",
           "PARCA_AGENT_LOG_LEVEL": "debug"}
    # Output to a file: a pipe nobody reads would block the shipper once full.
    log_file = open(tmp_path / f"shipper-{time.monotonic_ns()}.log", "wb")
    with log_file:
        return subprocess.Popen([sys.executable, "-m", "services.shipper"], cwd=ROOT, env=env,
                                stdout=log_file, stderr=subprocess.STDOUT)


def test_kill_9_during_an_outage_loses_nothing(tmp_path):
    store = FakeStore(port=free_port())
    sender = ProfileSender(str(tmp_path / "run"), resend_after=0.5)
    bodies = [profile_body(n) for n in range(10)]
    first = shipper_process(tmp_path, store.address)
    second = None
    try:
        send_acked(sender, bodies[:6])  # spooled, the store is down
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        for body in bodies[6:]:  # sent while no shipper runs: the sender keeps them
            sender.send(body)
        sender.poll()
        assert sender.pending() == 4
        store.start()
        second = shipper_process(tmp_path, store.address)
        assert wait_until(lambda: sender.poll() >= 0 and sender.pending() == 0, 20)
        assert wait_until(lambda: len(store.raw_profiles()) >= 10, 20)
        wait_until(lambda: False, 1.5)  # a duplicate would arrive within a send interval
        arrived = Counter(raw for _, raw in store.raw_profiles())
        assert arrived == Counter(b["pprof"] for b in bodies)
        second.send_signal(signal.SIGTERM)
        assert second.wait(5) == 0
    finally:
        sender.close()
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        store.stop()


def test_sigterm_during_an_outage_exits_0_quickly(tmp_path):
    # A black hole: connections are accepted by the kernel but never answered, so a write
    # waits for its deadline; SIGTERM must not wait for it.
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(16)
    proc = shipper_process(tmp_path, f"127.0.0.1:{hole.getsockname()[1]}")
    try:
        sender = ProfileSender(str(tmp_path / "run"), resend_after=0.5)
        send_acked(sender, [profile_body(1)])
        sender.close()
        time.sleep(1.5)  # the first send is under way
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(10)
        assert code == 0, "".join(p.read_text() for p in tmp_path.glob("shipper-*.log"))
        assert time.monotonic() - started < 5
        assert not (tmp_path / "run" / "shipper.sock").exists()
        assert len(os.listdir(tmp_path / "cache" / "spool")) == 1  # kept for the next start
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        hole.close()
