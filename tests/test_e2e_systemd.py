"""End to end with discovery: a unit's cgroup made by the test holds a C workload; the agent
with --systemd-units profiles it labeled systemd_unit=..., and a workload in an unlisted cgroup
is filtered out in the kernel. (systemd is not PID 1 here: discovery finds the unit's cgroup
directory under /sys/fs/cgroup, as it does in containers.)"""

from __future__ import annotations

import gzip
import subprocess
import time
import urllib.request

import pytest

import services.proto_gen  # noqa: F401
from pprof import profile_pb2

from tests.helpers.agent import running_agent
from tests.helpers.cgroups import CgroupFactory, real_mounts_or_skip, unique
from tests.helpers.workload import build_chain_workload

pytestmark = [pytest.mark.bpf, pytest.mark.e2e]


def sample_pids(url: str) -> set[int]:
    with urllib.request.urlopen(url, timeout=10) as r:
        p = profile_pb2.Profile()
        p.ParseFromString(gzip.decompress(r.read()))
    return {lab.num for s in p.sample for lab in s.label if p.string_table[lab.key] == "pid"}


def test_a_listed_unit_is_profiled_and_an_unlisted_cgroup_is_not(tmp_path):
    mounts = real_mounts_or_skip()
    factory = CgroupFactory(mounts)
    unit, other = unique("demo-") + ".service", unique("other-") + ".service"
    binary = build_chain_workload(tmp_path)
    workloads = []
    try:
        listed = factory.make(f"system.slice/{unit}")
        unlisted = factory.make(f"system.slice/{other}")
        for cgroup in (listed, unlisted):
            proc = subprocess.Popen([str(binary), "0", "50"])
            cgroup.add(proc.pid)
            workloads.append(proc)
        inside, outside = workloads
        with running_agent(f"--systemd-units={unit}") as agent:
            target = agent.wait_for_profile(lambda labels: labels.get("systemd_unit") == unit,
                                            seconds=60)
            assert target, agent.log()
            assert set(target["labels"]) == {"node", "systemd_unit"}
            time.sleep(4)  # a few more windows, in which the unlisted workload kept running
            pids = sample_pids(agent.url + target["profile_url"])
            assert pids == {inside.pid}, pids
            for t in agent.targets():
                assert t["labels"].get("pid") != str(outside.pid), "an unlisted cgroup was profiled"
            r = subprocess.run(["go", "tool", "pprof", "-symbolize=none", "-top",
                                agent.url + target["profile_url"]], capture_output=True,
                               text=True, timeout=120)
            assert "leaf" in r.stdout, r.stdout + r.stderr
            metrics = urllib.request.urlopen(agent.url + "/metrics", timeout=10).read().decode()
            filtered = [line for line in metrics.splitlines()
                        if line.startswith("parca_agent_collector_bpf_samples_filtered_total")]
            assert filtered and float(filtered[0].split()[-1]) > 0, filtered
    finally:
        for proc in workloads:
            proc.kill()
            proc.wait()
        factory.cleanup()
