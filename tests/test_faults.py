"""Faults while profiling, against the real agent: every service killed in turn, a process
that exits before its window is symbolized, and a pid reused by another program."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from services.parent_death import process_comm
from tests.helpers.agent import bpf_program_loaded, running_agent
from tests.helpers.services import wait_until
from tests.helpers.workload import CHAIN_SOURCE, build_chain_workload, compile_c

pytestmark = [pytest.mark.bpf, pytest.mark.e2e]
WINDOW = 3.0
SERVICES = ["collector", "discovery", "aggregator", "shipper", "ui"]


@pytest.fixture(scope="module")
def agent():
    with running_agent(duration=f"{WINDOW:g}s") as a:
        yield a
        programs = a.collector_programs()
        code, _ = a.terminate()
        assert code == 0
        assert not any(bpf_program_loaded(p) for p in programs)


def private_binary(agent, name: str, source: str = CHAIN_SOURCE):
    """A binary in a folder only root may enter: names must come through the binary cache."""
    directory = os.path.join(agent.base, f"private-{name}")
    os.makedirs(directory, mode=0o700, exist_ok=True)
    return compile_c(source, Path(directory) / name)


def profile_functions(agent, target) -> str:
    r = subprocess.run(["go", "tool", "pprof", "-symbolize=none", "-top",
                        agent.url + target["profile_url"]], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_every_service_killed_in_turn_comes_back_and_profiles_resume(agent, tmp_path):
    binary = build_chain_workload(tmp_path)
    workload = subprocess.Popen([str(binary), "0", "100"])
    mine = lambda labels: labels.get("pid") == str(workload.pid)  # noqa: E731
    try:
        assert agent.wait_for_profile(mine, seconds=60), agent.log()
        for service in SERVICES:
            pids = agent.service_pids()
            assert set(pids) == set(SERVICES), pids
            programs = agent.collector_programs()
            assert programs, (service, pids, agent.log())
            os.kill(pids[service], signal.SIGKILL)
            killed_at = time.time()
            assert wait_until(lambda: agent.service_pids().get(service, pids[service])
                              != pids[service], 15), f"{service} was not restarted"
            others = agent.service_pids()
            assert all(others.get(s) == pids[s] for s in SERVICES if s != service)
            # A window that started after the kill: its samples all came through the new process.
            resumed = agent.wait_for_profile(mine, after=killed_at + WINDOW, seconds=2 * WINDOW + 15)
            assert resumed, f"profiles did not resume after kill -9 of {service}:\n{agent.log()}"
            if service == "collector":
                assert not any(bpf_program_loaded(p) for p in programs), \
                    "the killed collector's BPF program stayed loaded"
            else:
                assert agent.collector_programs() == programs
    finally:
        workload.kill()
        workload.wait()


def test_a_process_that_exits_before_symbolization_keeps_its_names(agent):
    binary = private_binary(agent, "shortlived")
    # Sampling is on (any profile at all shows it): run alone, this test comes first, and a
    # 1.5 s workload would be over before the collector has compiled its program.
    assert agent.wait_for_profile(lambda labels: True, seconds=60), agent.log()
    # Runs 1.5 s and exits, long before its window closes and is symbolized.
    workload = subprocess.Popen([str(binary), "1.5", "100"])
    pid = workload.pid
    workload.wait()
    target = agent.wait_for_profile(lambda labels: labels.get("pid") == str(pid), seconds=30)
    assert target, agent.log()
    assert target["labels"]["comm"] == "shortlived"
    top = profile_functions(agent, target)
    assert "leaf" in top and "middle" in top, top


def test_a_reused_pid_is_profiled_as_the_new_program(agent):
    first = private_binary(agent, "firstprog")
    second = private_binary(agent, "secondprog")
    a = subprocess.Popen([str(first), "0", "100"])
    pid = a.pid
    try:
        assert agent.wait_for_profile(lambda l: l.get("pid") == str(pid)
                                      and l.get("comm") == "firstprog", seconds=30), agent.log()
    finally:
        a.kill()
        a.wait()
    # Ask the kernel for the same pid again (ns_last_pid), as a busy host eventually does.
    b = None
    for _ in range(50):
        with open("/proc/sys/kernel/ns_last_pid", "w") as fh:
            fh.write(str(pid - 1))
        candidate = subprocess.Popen([str(second), "0", "100"])
        if candidate.pid == pid:
            b = candidate
            break
        candidate.kill()
        candidate.wait()
    if b is None:
        pytest.fail("could not get the same pid back from the kernel in 50 tries")
    try:
        reused_at = time.time()
        target = agent.wait_for_profile(lambda l: l.get("pid") == str(pid)
                                        and l.get("comm") == "secondprog",
                                        after=reused_at, seconds=30)
        assert target, agent.log()
        assert target["labels"]["executable"].endswith("/secondprog")
        assert "leaf" in profile_functions(agent, target)
    finally:
        b.kill()
        b.wait()


@pytest.mark.parametrize("victim", ["parca-agent", "supervisord"])
def test_a_supervisor_killed_with_sigkill_takes_every_service_with_it(victim):
    """SIGKILL gives parca-agent and supervisord no chance to stop anything: the kernel's
    parent-death signal must, or the collector would sample on for nobody with its BPF
    program attached. Each service stops as on SIGTERM (the collector detaches)."""
    with running_agent(duration=f"{WINDOW:g}s") as agent:
        assert wait_until(lambda: agent.collector_programs(), 60), agent.log()
        programs = agent.collector_programs()
        processes = agent.descendants()
        supervisord = [p for p in processes if process_comm(p) == "supervisord"]
        assert len(supervisord) == 1 and len(processes) >= 6, processes
        os.kill(agent.proc.pid if victim == "parca-agent" else supervisord[0], signal.SIGKILL)
        left = wait_until(lambda: not [p for p in processes if _alive(p)], 30)
        assert left, [(p, process_comm(p)) for p in processes if _alive(p)]
        assert not any(bpf_program_loaded(p) for p in programs), \
            "the collector's BPF program outlived its supervisor"
        agent.proc.wait(10)


def _alive(pid: int) -> bool:
    """Running, not a zombie waiting for a dead parent's reaper."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
