"""Shared test set-up. Root/BPF tests carry the `bpf` marker and the `require_bpf` fixture:
they skip with a reason where BPF is missing, but under CI=true that skip fails the run."""

from __future__ import annotations

import os
import shutil

import pytest

IN_CI = os.environ.get("CI", "").lower() == "true"


def bpf_missing_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (CAP_BPF and CAP_PERFMON) to load BPF programs"
    import importlib.util

    # Found, not imported: importing bcc maps LLVM into the test process.
    if importlib.util.find_spec("bcc") is None:
        return "bcc is not importable (install python3-bpfcc; make test does)"
    if not os.path.exists(f"/lib/modules/{os.uname().release}/build"):
        return "no kernel headers at /lib/modules/$(uname -r)/build (make test links them)"
    if not os.path.exists("/sys/kernel/btf/vmlinux") and not os.path.exists("/sys/fs/bpf"):
        return "this kernel shows no BPF support"
    return None


def check_bpf() -> None:
    """Skip where BPF cannot run; under CI=true fail instead. For fixtures of any scope."""
    reason = bpf_missing_reason()
    if reason:
        if IN_CI:
            pytest.fail(f"BPF test cannot run under CI=true: {reason}")
        pytest.skip(reason)


@pytest.fixture
def require_bpf():
    check_bpf()


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if not path:
        if IN_CI:
            pytest.fail(f"{name} is missing under CI=true (make test installs it)")
        pytest.skip(f"{name} is not installed")
    return path


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    # Under CI a skipped root/BPF test is a failure: CI must exercise the real kernel path.
    if IN_CI and report.skipped and item.get_closest_marker("bpf") is not None:
        report.outcome = "failed"
        report.longrepr = f"skipped BPF test under CI=true: {report.longrepr}"
