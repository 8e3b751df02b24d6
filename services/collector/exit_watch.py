"""Tells which watched processes have exited, without reading each one's /proc entry.

A pidfd (pidfd_open, Linux 5.3) names one process, not a pid number, and polls readable once
that process has exited (its last thread gone, zombie or reaped). With every pidfd in one epoll
set, finding the processes that exited is one epoll_wait however many are watched, and a pid
reused by another process cannot be mistaken for the one watched. The check it replaces read
/proc/<pid>/stat of every watched process (the kernel sums every thread's times to print it):
~1 ms/s of the collector with a few hundred processes checked every 5 s on a busy host.

A process that cannot have a pidfd (no pidfd_open, file descriptors used up) is not watched:
``watch`` says so and the caller checks it the old way.
"""

from __future__ import annotations

import logging
import os
import resource
import select

log = logging.getLogger("parca_agent.collector.exits")


def raise_fd_limit(wanted: int) -> int:
    """Raise the soft limit on open files towards ``wanted`` (never above the hard limit, never
    lower); return the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as e:
            log.warning("could not raise the open-files limit to %d: %s", target, e)
    return soft


class ExitWatch:
    def __init__(self):
        self._epoll = select.epoll()
        self._fd_of: dict[int, int] = {}  # pid -> pidfd
        self._pid_of: dict[int, int] = {}  # pidfd -> pid

    def __len__(self) -> int:
        return len(self._fd_of)

    def watch(self, pid: int) -> bool:
        """Watch the process that pid names now (replacing an earlier watch of that pid: it
        may have been another process). False: it cannot be watched, or it is already gone.

        Call it before reading what identifies the process (its start time): then what was
        read belongs to the watched process, or to a later one after the watched one exited,
        which the watch reports."""
        self.unwatch(pid)
        try:
            fd = os.pidfd_open(pid)
        except (AttributeError, OSError):  # no such process, EMFILE, kernel before 5.3
            return False
        try:
            self._epoll.register(fd, select.EPOLLIN)
        except OSError:
            os.close(fd)
            return False
        self._fd_of[pid] = fd
        self._pid_of[fd] = pid
        return True

    def unwatch(self, pid: int) -> None:
        fd = self._fd_of.pop(pid, None)
        if fd is None:
            return
        del self._pid_of[fd]
        try:
            self._epoll.unregister(fd)
        except OSError:
            pass
        os.close(fd)

    def watched(self, pid: int) -> bool:
        return pid in self._fd_of

    def exited(self) -> list[int]:
        """The watched pids whose process has exited (they stay watched until unwatched)."""
        if not self._fd_of:
            return []
        # Room for every watched process: they stay readable, so one call returns them all.
        events = self._epoll.poll(0, len(self._fd_of))
        return [self._pid_of[fd] for fd, _ in events if fd in self._pid_of]

    def close(self) -> None:
        for pid in list(self._fd_of):
            self.unwatch(pid)
        self._epoll.close()
