"""ExitWatch with real processes: pidfds in an epoll set tell which processes exited."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time

from services.collector.exit_watch import ExitWatch, raise_fd_limit


def _sleeper() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


def _wait_for(predicate, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.01)
    return predicate()


def test_an_exited_process_is_reported_zombie_or_reaped_and_a_live_one_is_not():
    watch = ExitWatch()
    a, b, c = _sleeper(), _sleeper(), _sleeper()
    try:
        assert all(watch.watch(p.pid) for p in (a, b, c)) and len(watch) == 3
        assert watch.exited() == []
        a.kill()  # not reaped: a zombie still has /proc/<pid>/stat, but it is gone
        assert _wait_for(watch.exited) == [a.pid]
        b.kill()
        b.wait()  # reaped
        assert sorted(_wait_for(lambda: len(watch.exited()) == 2 and watch.exited())) == \
            sorted([a.pid, b.pid])
        watch.unwatch(a.pid)
        watch.unwatch(b.pid)
        assert watch.exited() == [] and len(watch) == 1 and watch.watched(c.pid)
    finally:
        for p in (a, b, c):
            p.kill()
            p.wait()
        watch.close()


def test_watching_a_pid_again_replaces_its_watch_and_a_gone_pid_cannot_be_watched():
    watch = ExitWatch()
    p = _sleeper()
    try:
        assert watch.watch(p.pid) and watch.watch(p.pid) and len(watch) == 1
        fds = len(os.listdir("/proc/self/fd"))
        assert watch.watch(p.pid) and len(os.listdir("/proc/self/fd")) == fds  # no fd leaked
    finally:
        p.kill()
        p.wait()
    assert not watch.watch(p.pid)  # reaped: no such process
    assert not watch.watched(p.pid) and len(watch) == 0
    watch.close()


def test_a_stopped_process_is_not_reported():
    watch = ExitWatch()
    p = _sleeper()
    try:
        watch.watch(p.pid)
        os.kill(p.pid, signal.SIGSTOP)
        time.sleep(0.1)
        assert watch.exited() == []
        os.kill(p.pid, signal.SIGCONT)
    finally:
        p.kill()
        p.wait()
        watch.close()


def test_the_open_files_limit_is_raised_within_the_hard_limit_and_never_lowered():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        wanted = soft + 100 if hard == resource.RLIM_INFINITY else min(soft + 100, hard)
        assert raise_fd_limit(wanted) == wanted == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        assert raise_fd_limit(10) == wanted  # never lowered
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
