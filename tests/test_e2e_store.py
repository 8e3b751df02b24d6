"""End to end with a store: `parca-agent --store-address` ships the workload's profiles over
gRPC to a real server (built from the same protos) and uploads the workload's binary once."""

from __future__ import annotations

import grp
import os
import shutil
import subprocess
import tempfile

import pytest

from tests.conftest import require_tool
from tests.helpers.agent import Agent
from tests.helpers.services import wait_until
from tests.helpers.store_server import FakeStore
from tests.helpers.workload import build_chain_workload

pytestmark = [pytest.mark.bpf, pytest.mark.e2e]


def test_profiles_and_debuginfo_reach_the_store(require_bpf, tmp_path):
    go = require_tool("go")
    store = FakeStore().start()
    # As on a host: the token is readable by root and the agent's group only.
    secrets = tempfile.mkdtemp(prefix="parca-agent-secrets-", dir="/tmp")
    token = os.path.join(secrets, "token")
    with open(token, "w") as fh:
        fh.write("s3cret-token\n")
    gid = grp.getgrnam("parca-agent").gr_gid
    for path, mode in ((secrets, 0o750), (token, 0o640)):
        os.chown(path, 0, gid)
        os.chmod(path, mode)
    agent = Agent(f"--store-address={store.address}", "--insecure",
                  f"--bearer-token-file={token}", duration="3s")
    workload = None
    try:
        directory = os.path.join(agent.base, "private")
        os.makedirs(directory, mode=0o700)
        binary = build_chain_workload(directory)
        os.chmod(directory, 0o700)
        workload = subprocess.Popen([str(binary), "0", "100"])

        def shipped():
            return [(labels, raw) for labels, raw in store.raw_profiles()
                    if labels.get("pid") == str(workload.pid)]
        found = wait_until(shipped, 60, interval=0.5)
        assert found, f"no profile of the workload reached the store:\n{agent.log()}"
        labels, raw = found[0]
        assert labels["__name__"] == "parca_agent_cpu"
        assert labels["comm"] == "chain" and labels["node"] == os.uname().nodename
        path = tmp_path / "shipped.pb.gz"
        path.write_bytes(raw)
        r = subprocess.run([go, "tool", "pprof", "-symbolize=none", "-top", str(path)],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and "leaf" in r.stdout, r.stdout + r.stderr
        with store.lock:
            tokens = set(store.received.authorization)
        assert "Bearer s3cret-token" in tokens, tokens
        assert "s3cret-token" not in agent.log(), "the token leaked into the logs"

        readelf = subprocess.run(["readelf", "-n", str(binary)], capture_output=True,
                                 text=True).stdout
        build_id = readelf.split("Build ID:")[1].split()[0]

        def uploaded():
            with store.lock:
                return store.received.uploads.get(build_id)
        blobs = wait_until(uploaded, 60, interval=0.5)
        assert blobs, f"the workload's binary was not uploaded:\n{agent.log()}"
        assert b"".join(blobs[:1]) == binary.read_bytes()
        with store.lock:
            asked = store.received.should_initiate.count(build_id)
        assert asked == 1, f"the store was asked about {build_id} {asked} times"
        code, _ = agent.terminate()
        assert code == 0
    finally:
        if workload is not None:
            workload.kill()
            workload.wait()
        agent.cleanup()
        store.stop()
        shutil.rmtree(secrets, ignore_errors=True)


def test_a_30_second_store_outage_loses_no_window_and_repeats_none(require_bpf, tmp_path):
    """The store goes away for 30 s while the agent profiles; once it is back every window of
    the workload arrives, each exactly once (spool + acknowledged channel)."""
    import gzip
    import time

    import services.proto_gen  # noqa: F401
    from pprof import profile_pb2

    store = FakeStore().start()
    port = store.port
    agent = Agent(f"--store-address={store.address}", "--insecure", duration="3s")
    workload = None
    try:
        binary = build_chain_workload(tmp_path)
        workload = subprocess.Popen([str(binary), "0", "100"])

        def windows():
            got = []
            for labels, raw in store.raw_profiles():
                if labels.get("pid") == str(workload.pid):
                    p = profile_pb2.Profile()
                    p.ParseFromString(gzip.decompress(raw))
                    got.append(p.time_nanos)
            return got
        assert wait_until(lambda: len(windows()) >= 2, 60), agent.log()
        store.stop()
        time.sleep(30)
        before = len(windows())
        store = FakeStore(port=port).start()
        # Every window of the outage (about 10) and those after it, until two more arrive.
        assert wait_until(lambda: len(windows()) >= before + 12, 90), agent.log()
        workload.kill()
        workload.wait()
        time.sleep(8)  # the last windows drain
        starts = sorted(windows())
        assert len(starts) == len(set(starts)), "a window arrived twice"
        gaps = [b - a for a, b in zip(starts, starts[1:])]
        assert all(g == 3_000_000_000 for g in gaps), f"windows missing: {gaps}"
    finally:
        if workload is not None and workload.poll() is None:
            workload.kill()
            workload.wait()
        agent.cleanup()
        store.stop()
