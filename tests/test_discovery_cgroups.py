"""Reading /proc/<pid>/cgroup and cgroup trees, against fixture trees (no root needed)."""

from __future__ import annotations

import os

from services.discovery import cgroups

DOCKER_ID = "a" * 64
CONTAINERD_ID = "0123456789abcdef" * 4
CRIO_ID = "fedcba9876543210" * 4
POD = "pod7d8f3a7e-1b2c-4d5e-8f90-123456789abc"

# /proc/<pid>/cgroup as each runtime leaves it, on hybrid (v1 + v2) and pure v2 hosts.
FIXTURES = {
    # docker, cgroupfs driver, cgroup v1 (the v2 line stays at the root)
    100: (f"12:pids:/docker/{DOCKER_ID}\n11:cpu,cpuacct:/docker/{DOCKER_ID}\n"
          f"1:name=systemd:/docker/{DOCKER_ID}\n0::/\n"),
    # docker, systemd driver, pure cgroup v2
    101: f"0::/system.slice/docker-{DOCKER_ID}.scope\n",
    # kubelet + containerd, systemd driver, cgroup v2
    200: ("0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-"
          f"{POD.replace('-', '_')}.slice/cri-containerd-{CONTAINERD_ID}.scope\n"),
    # kubelet + containerd, cgroupfs driver, cgroup v1 only
    201: (f"4:memory:/kubepods/besteffort/{POD}/{CONTAINERD_ID}\n"
          f"1:name=systemd:/kubepods/besteffort/{POD}/{CONTAINERD_ID}\n"),
    # kubelet + CRI-O, systemd driver, cgroup v2, with a sub-cgroup inside the container
    300: ("0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1.slice/"
          f"crio-{CRIO_ID}.scope/container\n"),
    # CRI-O's conmon monitor: not the container
    301: f"0::/kubepods.slice/kubepods-pod1.slice/crio-conmon-{CRIO_ID}.scope\n",
    # a plain host process
    400: "9:name=systemd:/user.slice/user-1000.slice/session-2.scope\n0::/user.slice\n",
}


def write_proc(tmp_path) -> str:
    proc = tmp_path / "proc"
    for pid, text in FIXTURES.items():
        (proc / str(pid)).mkdir(parents=True)
        (proc / str(pid) / "cgroup").write_text(text)
    (proc / "self").mkdir()  # not a pid: ignored
    return str(proc)


def test_parse_proc_cgroup_splits_hierarchy_controllers_and_path():
    lines = cgroups.parse_proc_cgroup("11:cpu,cpuacct:/a:b\n1:name=systemd:/x\n0::/y\ngarbage\n")
    assert [(l.hierarchy, l.controllers, l.path) for l in lines] == [
        (11, ("cpu", "cpuacct"), "/a:b"), (1, ("name=systemd",), "/x"), (0, (), "/y")]
    assert [l.is_unified for l in lines] == [False, False, True]


def test_container_ids_of_docker_containerd_and_crio_on_v1_and_v2(tmp_path):
    proc = write_proc(tmp_path)
    found = {pid: cgroups.read_process_cgroup(proc, pid) for pid in FIXTURES}
    assert found[100].container_id == DOCKER_ID
    assert found[100].container_unified_path is None  # v1 only: nothing to filter on in v2
    assert found[101].container_id == DOCKER_ID
    assert found[101].container_unified_path == f"/system.slice/docker-{DOCKER_ID}.scope"
    assert found[200].container_id == CONTAINERD_ID
    assert found[200].container_unified_path.endswith(f"/cri-containerd-{CONTAINERD_ID}.scope")
    assert found[201].container_id == CONTAINERD_ID
    assert found[201].unified_path is None
    assert found[300].container_id == CRIO_ID
    # The container's own directory, not the sub-cgroup its process sits in.
    assert found[300].container_unified_path.endswith(f"/crio-{CRIO_ID}.scope")
    assert found[301].container_id is None
    assert found[400].container_id is None
    assert found[400].unified_path == "/user.slice"


def test_scan_groups_processes_by_container(tmp_path):
    scan = cgroups.scan_containers(write_proc(tmp_path))
    assert set(scan) == {DOCKER_ID, CONTAINERD_ID, CRIO_ID}
    assert scan[DOCKER_ID].pids == {100, 101}
    assert scan[CONTAINERD_ID].pids == {200, 201}
    assert scan[CRIO_ID].pids == {300}


def test_a_process_that_vanishes_mid_scan_is_skipped(tmp_path):
    assert cgroups.read_process_cgroup(str(tmp_path), 12345) is None


def test_nested_containers_belong_to_the_innermost():
    outer, inner = "1" * 64, "2" * 64
    assert cgroups.container_in_path(f"/docker/{outer}/docker/{inner}") == (
        inner, f"/docker/{outer}/docker/{inner}")


def test_runtime_scheme_is_stripped():
    assert cgroups.strip_runtime_scheme(f"containerd://{CONTAINERD_ID}") == CONTAINERD_ID
    assert cgroups.strip_runtime_scheme(f"cri-o://{CRIO_ID}") == CRIO_ID
    assert cgroups.strip_runtime_scheme(DOCKER_ID) == DOCKER_ID


def test_mounts_hybrid_pure_v2_and_v1_only(tmp_path):
    hybrid = tmp_path / "hybrid"
    (hybrid / "unified").mkdir(parents=True)
    (hybrid / "unified" / "cgroup.controllers").write_text("")
    (hybrid / "systemd").mkdir()
    (hybrid / "systemd" / "cgroup.procs").write_text("")
    assert cgroups.find_mounts(str(hybrid)) == cgroups.CgroupMounts(
        str(hybrid / "unified"), str(hybrid / "systemd"))
    pure = tmp_path / "pure"
    pure.mkdir()
    (pure / "cgroup.controllers").write_text("")
    assert cgroups.find_mounts(str(pure)) == cgroups.CgroupMounts(str(pure), None)
    v1 = tmp_path / "v1"
    (v1 / "systemd").mkdir(parents=True)
    (v1 / "systemd" / "cgroup.procs").write_text("")
    assert cgroups.find_mounts(str(v1)) == cgroups.CgroupMounts(None, str(v1 / "systemd"))


def test_ids_and_pids_cover_a_directory_and_its_children(tmp_path):
    unit = tmp_path / "system.slice" / "x.service"
    (unit / "child").mkdir(parents=True)
    (unit / "cgroup.procs").write_text("10\n11\n")
    (unit / "child" / "cgroup.procs").write_text("12\n")
    assert cgroups.pids_under(str(unit)) == {10, 11, 12}
    assert cgroups.cgroup_ids(str(unit)) == {os.stat(unit).st_ino, os.stat(unit / "child").st_ino}
    assert cgroups.pids_under(str(tmp_path / "missing")) == set()
