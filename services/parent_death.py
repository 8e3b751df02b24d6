"""The kernel's parent-death signal (prctl PR_SET_PDEATHSIG), for processes that must not
outlive their supervisor. No imports beyond the standard library: `parca-agent` uses it
before anything else is loaded, and between fork and exec of supervisord."""

from __future__ import annotations

import ctypes
import os
import signal

PR_SET_PDEATHSIG = 1  # prctl(2)

try:  # resolved now: a forked child about to exec should only make the call
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux
    _prctl = None


def ask(sig: int = signal.SIGTERM) -> bool:
    """Ask for ``sig`` when our parent dies; False where the kernel has no such request."""
    return _prctl is not None and _prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask for ``sig`` when our parent (supervisord) dies, so that a SIGKILLed supervisor
    leaves no service running on (a collector with its BPF program attached, sampling for
    nobody). Set by each service itself: the kernel clears it when credentials change, and
    supervisord drops the services to the agent's user."""
    if not ask(sig):
        return  # the supervisor's own stop still works
    # Our parent may have died before the request (between supervisord's fork and here): then
    # nobody will signal us, and the process we now hang from is not supervisord.
    if os.environ.get("SUPERVISOR_ENABLED") and process_comm(os.getppid()) != "supervisord":
        os.kill(os.getpid(), sig)


def process_comm(pid: int) -> str:
    """/proc/<pid>/comm, or "" when the process is gone."""
    try:
        with open(f"/proc/{pid}/comm") as fh:
            return fh.read().strip()
    except OSError:
        return ""
