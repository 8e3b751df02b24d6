"""Real cgroups for tests: directories made under the cgroup v2 mount (and the v1 name=systemd
hierarchy where there is one), with real processes moved in by writing their pid to
cgroup.procs, and everything put back on removal."""

from __future__ import annotations

import os
import subprocess
import time
import uuid

import pytest

from services.discovery.cgroups import CgroupMounts, find_mounts

CGROUP_PATH = "/sys/fs/cgroup"


def real_mounts_or_skip() -> CgroupMounts:
    if os.geteuid() != 0:
        pytest.skip("making cgroups needs root")
    mounts = find_mounts(CGROUP_PATH)
    if mounts.unified is None:
        pytest.skip(f"no cgroup v2 mount under {CGROUP_PATH}")
    if not os.access(mounts.unified, os.W_OK):
        pytest.skip(f"{mounts.unified} is not writable here")
    return mounts


def unique(prefix: str) -> str:
    """Names carry a random part: other suites may make cgroups on this machine at once."""
    return f"{prefix}{uuid.uuid4().hex[:8]}"


class RealCgroup:
    """One cgroup path (``/system.slice/demo.service``) made in every hierarchy we read."""

    def __init__(self, mounts: CgroupMounts, path: str):
        self.path = "/" + path.strip("/")
        self.roots = [m for m in (mounts.unified, mounts.systemd_v1) if m is not None]
        self.unified_dir = os.path.join(mounts.unified, self.path.lstrip("/"))
        self._made: list[str] = []  # directories we created, parents first
        for root in self.roots:
            current = root
            for part in self.path.strip("/").split("/"):
                current = os.path.join(current, part)
                try:
                    os.mkdir(current)
                    self._made.append(current)
                except FileExistsError:
                    pass  # a parent another cgroup (or suite) made: theirs to remove

    @property
    def inode(self) -> int:
        return os.stat(self.unified_dir).st_ino

    def add(self, pid: int) -> None:
        for root in self.roots:
            with open(os.path.join(root, self.path.lstrip("/"), "cgroup.procs"), "w") as fh:
                fh.write(str(pid))

    def remove(self) -> None:
        """Move every process back to the root cgroup, then remove what we made."""
        for directory in reversed(self._made):
            if not os.path.isdir(directory):
                continue
            root = next(r for r in self.roots if directory.startswith(r))
            try:
                with open(os.path.join(directory, "cgroup.procs")) as fh:
                    pids = fh.read().split()
            except OSError:
                pids = []
            for pid in pids:
                try:
                    with open(os.path.join(root, "cgroup.procs"), "w") as fh:
                        fh.write(pid)
                except OSError:
                    pass  # it exited meanwhile
            for _ in range(25):
                try:
                    os.rmdir(directory)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.02)  # an exiting process leaves the cgroup a moment later
        self._made.clear()


def start_sleeper() -> subprocess.Popen:
    return subprocess.Popen(["sleep", "300"])


def stop_process(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=5)


class CgroupFactory:
    """Makes cgroups with processes in them; ``cleanup`` undoes everything it made."""

    def __init__(self, mounts: CgroupMounts):
        self.mounts = mounts
        self.cgroups: list[RealCgroup] = []
        self.processes: list[subprocess.Popen] = []

    def make(self, path: str) -> RealCgroup:
        cgroup = RealCgroup(self.mounts, path)
        self.cgroups.append(cgroup)
        return cgroup

    def process_in(self, cgroup: RealCgroup) -> subprocess.Popen:
        proc = start_sleeper()
        self.processes.append(proc)
        cgroup.add(proc.pid)
        return proc

    def cleanup(self) -> None:
        for proc in self.processes:
            stop_process(proc)
        for cgroup in reversed(self.cgroups):
            cgroup.remove()


def discovery_settings(**values: str):
    """Settings as a service would read them from PARCA_AGENT_* variables, Kubernetes off
    unless given."""
    from services.settings import ENV_PREFIX, resolve

    environ = {"PARCA_AGENT_KUBERNETES": "false", "PARCA_AGENT_NODE": "test-node"}
    environ.update({ENV_PREFIX + k.upper(): v for k, v in values.items()})
    return resolve(None, environ)
