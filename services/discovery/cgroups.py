"""Reading cgroups: where the hierarchies are mounted, which cgroup a process is in, which
container a cgroup path belongs to, and which processes and cgroup ids a directory holds.

Every path is a parameter (``proc_path``, ``cgroup_path``), so tests read fixture trees.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

# Container runtimes name a container's cgroup after its 64-hex id, sometimes with a prefix and,
# under the systemd cgroup driver, a ".scope" suffix:
#   docker (cgroupfs)          /docker/<id>
#   docker (systemd)           /system.slice/docker-<id>.scope
#   kubelet + containerd       /kubepods/besteffort/pod<uid>/<id>
#                              /kubepods.slice/.../cri-containerd-<id>.scope
#   kubelet + CRI-O            /kubepods.slice/.../crio-<id>.scope  (crio-conmon-<id> is the
#                              monitor, not the container: "conmon-" is not hex, so no match)
#   podman                     /machine.slice/libpod-<id>.scope
_CONTAINER_COMPONENT = re.compile(
    r"^(?:(?:docker|cri-containerd|crio|libpod)-)?([0-9a-f]{64})(?:\.scope)?$")


@dataclass(frozen=True)
class CgroupMounts:
    """The hierarchies discovery reads: cgroup v2 (ids) and the v1 ``name=systemd`` one."""

    unified: str | None  # the cgroup v2 mount, or None on a v1-only host
    systemd_v1: str | None  # the name=systemd v1 hierarchy, or None


def find_mounts(cgroup_path: str) -> CgroupMounts:
    """Pure v2 (``cgroup_path`` itself is v2), hybrid (``unified/``) or v1 only."""
    if os.path.exists(os.path.join(cgroup_path, "cgroup.controllers")):
        return CgroupMounts(unified=cgroup_path, systemd_v1=None)
    unified = os.path.join(cgroup_path, "unified")
    systemd_v1 = os.path.join(cgroup_path, "systemd")
    return CgroupMounts(
        unified=unified if os.path.exists(os.path.join(unified, "cgroup.controllers")) else None,
        systemd_v1=systemd_v1 if os.path.exists(os.path.join(systemd_v1, "cgroup.procs")) else None,
    )


@dataclass(frozen=True)
class CgroupLine:
    """One line of /proc/<pid>/cgroup: ``hierarchy-id:controllers:path``."""

    hierarchy: int
    controllers: tuple[str, ...]
    path: str

    @property
    def is_unified(self) -> bool:
        return self.hierarchy == 0 and not self.controllers


def parse_proc_cgroup(text: str) -> list[CgroupLine]:
    lines = []
    for raw in text.splitlines():
        # The path may itself hold ':' (it is a directory name), so split only twice.
        parts = raw.split(":", 2)
        if len(parts) != 3 or not parts[0].isdigit():
            continue
        controllers = tuple(c for c in parts[1].split(",") if c)
        lines.append(CgroupLine(int(parts[0]), controllers, parts[2]))
    return lines


def container_in_path(path: str) -> tuple[str, str] | None:
    """``(container id, the container's cgroup path)`` for a cgroup path inside a container.

    The innermost match wins: a container nested in another (docker in docker) is its own
    target, and sub-cgroups a container makes inside its own stay with it.
    """
    components = path.strip("/").split("/")
    for i in range(len(components) - 1, -1, -1):
        m = _CONTAINER_COMPONENT.match(components[i])
        if m:
            return m.group(1), "/" + "/".join(components[: i + 1])
    return None


def strip_runtime_scheme(container_id: str) -> str:
    """``containerd://<id>``, ``docker://<id>``, ``cri-o://<id>`` -> ``<id>``."""
    return container_id.split("://", 1)[-1]


@dataclass
class ProcessCgroup:
    pid: int
    unified_path: str | None  # path on the cgroup v2 line, if the process has one
    container_id: str | None
    container_unified_path: str | None  # the container's v2 directory, when it has one


def read_process_cgroup(proc_path: str, pid: int) -> ProcessCgroup | None:
    """None when the process is gone (it raced us) or its file is unreadable."""
    try:
        with open(os.path.join(proc_path, str(pid), "cgroup")) as fh:
            lines = parse_proc_cgroup(fh.read())
    except OSError:
        return None
    unified_path = next((line.path for line in lines if line.is_unified), None)
    container_id = None
    container_unified_path = None
    if unified_path is not None and (found := container_in_path(unified_path)):
        container_id, container_unified_path = found
    else:
        # cgroup v1 only (or a runtime that leaves v2 alone on a hybrid host): any v1 line names
        # the container, and there is no v2 directory to filter on in the kernel.
        for line in lines:
            if found := container_in_path(line.path):
                container_id = found[0]
                break
    return ProcessCgroup(pid, unified_path, container_id, container_unified_path)


def list_pids(proc_path: str) -> list[int]:
    try:
        return [int(name) for name in os.listdir(proc_path) if name.isdigit()]
    except OSError:
        return []


@dataclass
class ContainerCgroups:
    """What the process scan found for one container."""

    pids: set[int] = field(default_factory=set)
    unified_paths: set[str] = field(default_factory=set)  # the container's v2 directories


def scan_containers(proc_path: str) -> dict[str, ContainerCgroups]:
    """Every container id seen in /proc/*/cgroup, with its processes and v2 directories."""
    containers: dict[str, ContainerCgroups] = {}
    for pid in list_pids(proc_path):
        found = read_process_cgroup(proc_path, pid)
        if found is None or found.container_id is None:
            continue
        entry = containers.setdefault(found.container_id, ContainerCgroups())
        entry.pids.add(pid)
        if found.container_unified_path is not None:
            entry.unified_paths.add(found.container_unified_path)
    return containers


def in_mount(mount: str, cgroup_relative_path: str) -> str:
    """The directory of a cgroup path (as /proc/<pid>/cgroup shows it) under a mount."""
    return os.path.join(mount, cgroup_relative_path.lstrip("/"))


def walk_cgroup_dirs(directory: str) -> list[str]:
    """The directory and every cgroup below it (a process may sit in any of them)."""
    found = []
    for root, dirs, _files in os.walk(directory):
        found.append(root)
        dirs.sort()
    return found


def cgroup_ids(directory: str) -> set[int]:
    """cgroup v2 ids of a directory and its descendants: the id is the directory's inode,
    which is what bpf_get_current_cgroup_id() returns."""
    ids = set()
    for d in walk_cgroup_dirs(directory):
        try:
            ids.add(os.stat(d).st_ino)
        except OSError:
            continue  # removed while we walked
    return ids


def pids_under(directory: str) -> set[int]:
    """Processes in a cgroup directory and its descendants (``cgroup.procs`` of each)."""
    pids: set[int] = set()
    for d in walk_cgroup_dirs(directory):
        try:
            with open(os.path.join(d, "cgroup.procs")) as fh:
                pids.update(int(x) for x in fh.read().split())
        except (OSError, ValueError):
            continue
    return pids
