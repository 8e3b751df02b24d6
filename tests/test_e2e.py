"""End to end: `parca-agent` as a subprocess profiles a C workload; `go tool pprof` reads the
profile from the agent's own URL; SIGTERM leaves nothing behind. (Kill -9 of each service:
test_faults.py.)"""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.conftest import require_tool
from tests.helpers.agent import bpf_program_loaded, running_agent
from tests.helpers.workload import build_chain_workload

pytestmark = [pytest.mark.bpf, pytest.mark.e2e]
WINDOW = 3.0


@pytest.fixture(scope="module")
def agent():
    with running_agent(duration=f"{WINDOW:g}s") as a:
        yield a


@pytest.fixture(scope="module")
def workload(agent):
    # In a private folder (mode 0700 under pytest's tmp): the unprivileged aggregator cannot
    # open it, so its names must come through the collector's binary cache.
    directory = os.path.join(agent.base, "private")
    os.makedirs(directory, mode=0o700)
    binary = build_chain_workload(directory)
    os.chmod(directory, 0o700)
    proc = subprocess.Popen([str(binary), "0", "100"])
    yield proc
    proc.kill()
    proc.wait()


def is_workload(proc):
    return lambda labels: labels.get("pid") == str(proc.pid)


def test_profile_reaches_the_ui_and_go_tool_pprof_reads_it(agent, workload):
    go = require_tool("go")
    target = agent.wait_for_profile(is_workload(workload), seconds=60)
    assert target, f"no profile of the workload within 60 s:\n{agent.log()}"
    labels = target["labels"]
    assert labels["comm"] == "chain" and labels["node"] == os.uname().nodename
    assert labels["executable"].endswith("/chain")
    url = agent.url + target["profile_url"]
    r = subprocess.run([go, "tool", "pprof", "-symbolize=none", "-top", url],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    top = [line.split() for line in r.stdout.splitlines() if line.strip().endswith("leaf")]
    assert top, r.stdout
    flat_share = float(top[0][1].rstrip("%"))
    assert flat_share > 80, f"leaf should hold nearly all samples:\n{r.stdout}"
    r = subprocess.run([go, "tool", "pprof", "-symbolize=none", "-traces", url],
                       capture_output=True, text=True, timeout=120)
    chains = [block.split() for block in r.stdout.split("-----------+")]
    assert any(_is_subsequence(["leaf", "middle", "outer", "main"], c) for c in chains), r.stdout


def _is_subsequence(wanted, words):
    it = iter(words)
    return all(w in it for w in wanted)


def test_sigterm_stops_everything_and_leaves_nothing(agent):
    assert agent.service_pids(), "the agent is not running"
    programs = agent.collector_programs()
    assert programs, "the collector holds no BPF program"
    code, took = agent.terminate(timeout=10)
    assert code == 0, agent.log()
    assert took < 10
    assert agent.descendants() == [], "a child process survived SIGTERM"
    leftovers = [f for f in os.listdir(agent.run_dir)] if os.path.isdir(agent.run_dir) else []
    assert leftovers == [], f"files left in the run directory: {leftovers}"
    assert not any(bpf_program_loaded(p) for p in programs), "a BPF program survived SIGTERM"
