"""`parca-agent tap` against a real collector prints the workload's stacks."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from services import wire
from services.collector.service import drain_interval
from tests.helpers.services import (PYTHON, ROOT, service_env, start_service, stop, wait_until)
from tests.helpers.workload import build_chain_workload

pytestmark = pytest.mark.bpf


@pytest.fixture
def collector_run_dir(tmp_path, require_bpf):
    run_dir, cache_dir = str(tmp_path / "run"), str(tmp_path / "cache")
    os.makedirs(run_dir)
    log = str(tmp_path / "collector.log")
    p = start_service("collector", service_env(run_dir, cache_dir), log)
    assert wait_until(lambda: os.path.exists(os.path.join(run_dir, wire.ENDPOINT_COLLECTOR))
                      or p.poll() is not None, 60)
    assert p.poll() is None, open(log).read()
    yield run_dir
    assert stop(p) == 0


def tap(run_dir: str, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PARCA_AGENT_")}
    r = subprocess.run([PYTHON, "-m", "services.cli", "tap", "--run-dir", run_dir, *args],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_tap_folded_prints_the_workload_chain(collector_run_dir, tmp_path):
    binary = build_chain_workload(tmp_path)
    workload = subprocess.Popen([str(binary), "0", "100"])
    try:
        out = tap(collector_run_dir, "--format=folded", "--duration=6")
    finally:
        workload.kill()
        workload.wait()
    lines = [line for line in out.splitlines() if line.startswith("chain;")]
    assert lines, out[-2000:]
    stack, count = lines[0].rsplit(" ", 1)
    assert int(count) > 0
    assert any("main;outer;middle;leaf" in line for line in lines), lines[:5]


def test_tap_json_lines_carry_header_and_body(collector_run_dir):
    # Long enough for a drain: every 5 s on 2 CPUs (services/collector/service.py).
    drain = drain_interval(10, os.cpu_count() or 1, 100)
    out = tap(collector_run_dir, f"--duration={drain + 2:g}")
    messages = [json.loads(line) for line in out.splitlines()]
    samples = [m for m in messages if m["type"] == "samples"]
    assert samples, out[-2000:]
    first = samples[0]
    assert first["src"] == "collector" and first["seq"] >= 1
    assert {"records", "stacks", "kernel_symbols", "frequency"} <= set(first["body"])
