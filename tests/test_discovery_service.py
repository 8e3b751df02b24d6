"""The discovery service end to end at the socket level: `python -m services.discovery` as a
subprocess, a real SUB socket, messages decoded by services.wire."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

import pytest
import zmq

from services import wire
from tests.helpers.cgroups import CgroupFactory, real_mounts_or_skip, unique

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def factory():
    made = CgroupFactory(real_mounts_or_skip())
    yield made
    made.cleanup()


def next_targets(sock: zmq.Socket, predicate, timeout: float = 8.0) -> wire.Message:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sock.poll(int(max(deadline - time.monotonic(), 0) * 1000) + 1):
            msg = wire.decode(sock.recv_multipart())
            if msg.type == "targets" and predicate(msg.body):
                return msg
    raise AssertionError("no matching targets message")


@contextlib.contextmanager
def running_service(run_dir, log_path, topics: list[bytes], **env_values: str):
    """`python -m services.discovery` and a SUB socket on its endpoint; killed if a test fails
    before it stopped the service itself.

    The socket connects before the service binds (ZeroMQ retries quickly); the service's XPUB
    sees it join and sends it the snapshot whenever it connects."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RECONNECT_IVL, 20)
    for topic in topics:
        sock.setsockopt(zmq.SUBSCRIBE, topic)
    sock.connect(wire.endpoint(str(run_dir), wire.ENDPOINT_DISCOVERY))
    env = dict(os.environ, PARCA_AGENT_RUN_DIR=str(run_dir), PARCA_AGENT_KUBERNETES="false",
               PARCA_AGENT_NODE="test-node", PYTHONPATH=REPO)
    env.update({"PARCA_AGENT_" + k.upper(): v for k, v in env_values.items()})
    with open(log_path, "w") as log:
        service = subprocess.Popen([sys.executable, "-m", "services.discovery"], cwd=REPO,
                                   env=env, stderr=log)
    try:
        yield service, sock
    finally:
        if service.poll() is None:
            service.kill()
            service.wait()
        sock.close()
        ctx.term()


def units_in(body) -> set[str]:
    return {t["labels"].get("systemd_unit") for t in body["targets"]}


def test_service_publishes_the_unit_follows_it_and_stops_on_sigterm(factory, tmp_path):
    unit = unique("demo-") + ".service"
    cgroup = factory.make(f"system.slice/{unit}")
    process = factory.process_in(cgroup)
    run_dir = tmp_path / "run"
    with running_service(run_dir, tmp_path / "discovery.log", [b"targets"],
                         systemd_units=unit) as (service, sock):
        msg = next_targets(sock, lambda body: unit in units_in(body))
        assert msg.src == "discovery"
        assert msg.body["filtering"] is True
        [target] = msg.body["targets"]
        assert target["labels"] == {"node": "test-node", "systemd_unit": unit}
        assert target["cgroup_ids"] == [cgroup.inode]
        assert process.pid in target["pids"]

        # The unit stops: a new snapshot without it goes out at once (not only every 5 s).
        process.kill()
        process.wait()
        cgroup.remove()
        stopped_at = time.monotonic()
        next_targets(sock, lambda body: body["targets"] == [], timeout=4.0)
        assert time.monotonic() - stopped_at < 3.5

        service.send_signal(signal.SIGTERM)
        assert service.wait(timeout=5) == 0
        assert not (run_dir / wire.ENDPOINT_DISCOVERY).exists()


def test_service_sends_heartbeats_with_its_metrics(tmp_path):
    with running_service(tmp_path, tmp_path / "discovery.log", [b""]) as (service, sock):
        seen: dict[str, wire.Message] = {}
        deadline = time.monotonic() + 8
        while len(seen) < 2 and time.monotonic() < deadline:
            if sock.poll(200):
                msg = wire.decode(sock.recv_multipart())
                seen[msg.type] = msg
        assert seen["targets"].body == {"targets": [], "filtering": False}  # a plain host
        beat = seen["heartbeat"]
        assert beat.topic == b"heartbeat.discovery"
        assert beat.body["pid"] == service.pid
        names = {name for name, _, _ in beat.body["metrics"]}
        assert "parca_agent_discovery_scans_total" in names
        service.send_signal(signal.SIGTERM)
        assert service.wait(timeout=5) == 0


def test_a_subscriber_gets_the_snapshot_when_it_joins_not_on_a_timer(tmp_path):
    """The snapshot repeats only every REPUBLISH_SECONDS (60 s); a subscriber that connects
    later, or subscribes again on its socket (a gap to repair), is sent it at once because the
    socket is a verbose XPUB. A subscription to another topic sends nothing."""
    from services.discovery.service import REPUBLISH_SECONDS

    assert REPUBLISH_SECONDS >= 30  # else the timings below could be the repeat's
    with running_service(tmp_path, tmp_path / "discovery.log", [b"targets"]) as (service, sock):
        next_targets(sock, lambda body: True)
        time.sleep(2.0)  # long past start-up: nothing more comes on its own
        assert not sock.poll(500)

        ctx = zmq.Context.instance()
        late = ctx.socket(zmq.SUB)
        late.setsockopt(zmq.LINGER, 0)
        late.setsockopt(zmq.SUBSCRIBE, b"")  # a tap: everything, targets included
        late.connect(wire.endpoint(str(tmp_path), wire.ENDPOINT_DISCOVERY))
        joined_at = time.monotonic()
        next_targets(late, lambda body: body == {"targets": [], "filtering": False}, timeout=3.0)
        assert time.monotonic() - joined_at < 1.5
        # The first subscriber is sent it too (one publish goes to all); drain it.
        next_targets(sock, lambda body: True, timeout=2.0)

        sock.setsockopt(zmq.SUBSCRIBE, b"heartbeat")  # not targets: no snapshot for it
        assert not _targets_within(sock, 1.0)
        sock.setsockopt(zmq.SUBSCRIBE, b"targets")  # again on the same socket: a join
        assert _targets_within(sock, 1.5)

        # A peer subscribing over and over gets a few snapshots a second, not one each.
        for _ in range(200):
            late.setsockopt(zmq.SUBSCRIBE, b"targets")
        time.sleep(1.0)
        count = 0
        while late.poll(100):
            count += wire.decode(late.recv_multipart()).type == "targets"
        assert 1 <= count <= 8
        late.close()
        service.send_signal(signal.SIGTERM)
        assert service.wait(timeout=5) == 0


def _targets_within(sock: zmq.Socket, seconds: float) -> bool:
    try:
        next_targets(sock, lambda body: True, timeout=seconds)
        return True
    except AssertionError:
        return False
