"""Kubernetes containers as targets. The API server is a stand-in (tests/helpers/kube_api.py,
not Kubernetes) that the real `kubernetes` client talks to; the containers are real cgroups made
by the test, named as containerd and the kubelet name them, with real processes inside."""

from __future__ import annotations

import logging
import socket
import time
import uuid

import pytest

from services.discovery.kubernetes import (PodWatcher, load_api_client, running_containers,
                                           start_pod_watcher)
from services.discovery.service import Discovery
from services.runtime import Metrics
from tests.helpers.cgroups import CgroupFactory, discovery_settings, real_mounts_or_skip
from tests.helpers.kube_api import FakeKubeAPI, make_pod, write_kubeconfig

log = logging.getLogger("test.discovery")
NODE = "test-node"


@pytest.fixture
def api():
    server = FakeKubeAPI().start()
    yield server
    server.stop()


@pytest.fixture
def factory():
    made = CgroupFactory(real_mounts_or_skip())
    yield made
    made.cleanup()


class Cluster:
    """The stand-in API, a pod watcher on it, and discovery reading real cgroups."""

    def __init__(self, api: FakeKubeAPI, factory: CgroupFactory, kubeconfig: str,
                 selector: str = ""):
        self.api = api
        self.factory = factory
        self.metrics = Metrics("test")
        self.watcher = start_pod_watcher(kubeconfig, NODE, selector, log, self.metrics)
        assert isinstance(self.watcher, PodWatcher)
        settings = discovery_settings(kubernetes="true", kubeconfig=kubeconfig, node=NODE)
        self.discovery = Discovery(settings, log, self.metrics, pod_watcher=self.watcher)

    def container(self, layout: str = "systemd") -> tuple[str, int, int]:
        """A container's cgroup with a process in it: (container id, pid, cgroup id)."""
        container_id = uuid.uuid4().hex + uuid.uuid4().hex
        pod_uid = uuid.uuid4().hex
        if layout == "systemd":
            path = ("kubepods.slice/kubepods-besteffort.slice/"
                    f"kubepods-besteffort-pod{pod_uid}.slice/cri-containerd-{container_id}.scope")
        else:
            path = f"kubepods/besteffort/pod{pod_uid}/{container_id}"
        cgroup = self.factory.make(path)
        process = self.factory.process_in(cgroup)
        return container_id, process.pid, cgroup.inode

    def targets_when(self, predicate, timeout: float = 10.0):
        deadline = time.monotonic() + timeout
        while True:
            snapshot = self.discovery.snapshot()
            if predicate(snapshot.targets):
                return snapshot
            if time.monotonic() > deadline:
                raise AssertionError(f"targets never matched: {snapshot.targets}")
            time.sleep(0.1)

    def stop(self) -> None:
        self.watcher.stop()


@pytest.fixture
def cluster(api, factory, tmp_path):
    made = Cluster(api, factory, api.write_kubeconfig(tmp_path / "kubeconfig"))
    yield made
    made.stop()


def pods_of(targets) -> set[str]:
    return {t.labels["pod"] for t in targets}


def test_running_containers_on_this_node_become_labeled_targets(cluster):
    here_id, here_pid, here_cgroup = cluster.container("systemd")
    v1_id, v1_pid, _ = cluster.container("cgroupfs")
    elsewhere_id, elsewhere_pid, _ = cluster.container()
    cluster.api.put_pod(make_pod("web", NODE, {"app": here_id, "sidecar": v1_id},
                                 namespace="shop"))
    cluster.api.put_pod(make_pod("far", "other-node", {"app": elsewhere_id}))

    snapshot = cluster.targets_when(lambda ts: len(ts) == 2)

    assert snapshot.filtering is True
    by_container = {t.labels["container"]: t for t in snapshot.targets}
    assert by_container["app"].labels == {"node": NODE, "namespace": "shop", "pod": "web",
                                          "container": "app", "containerid": here_id}
    assert by_container["app"].cgroup_ids == {here_cgroup}
    assert by_container["app"].pids == {here_pid}
    assert by_container["sidecar"].pids == {v1_pid}
    assert all(elsewhere_pid not in t.pids for t in snapshot.targets)


def test_targets_follow_pods_added_and_deleted(cluster):
    first_id, _, _ = cluster.container()
    second_id, second_pid, _ = cluster.container()
    cluster.api.put_pod(make_pod("one", NODE, {"app": first_id}))
    cluster.targets_when(lambda ts: pods_of(ts) == {"one"})

    cluster.api.put_pod(make_pod("two", NODE, {"app": second_id}))
    snapshot = cluster.targets_when(lambda ts: pods_of(ts) == {"one", "two"})
    assert {t.labels["pod"]: t.pids for t in snapshot.targets}["two"] == {second_pid}

    cluster.api.delete_pod("default", "one")
    cluster.targets_when(lambda ts: pods_of(ts) == {"two"})
    assert cluster.api.list_requests == 1  # the changes came over the watch


def test_a_label_selector_that_excludes_a_pod_excludes_its_container(api, factory, tmp_path):
    cluster = Cluster(api, factory, api.write_kubeconfig(tmp_path / "kubeconfig"),
                      selector="profile=yes")
    try:
        chosen_id, _, _ = cluster.container()
        other_id, other_pid, _ = cluster.container()
        api.put_pod(make_pod("chosen", NODE, {"app": chosen_id}, labels={"profile": "yes"}))
        api.put_pod(make_pod("ignored", NODE, {"app": other_id}, labels={"profile": "no"}))
        snapshot = cluster.targets_when(lambda ts: pods_of(ts) == {"chosen"})
        time.sleep(0.5)  # give a wrongly included pod time to show up
        snapshot = cluster.discovery.snapshot()
        assert pods_of(snapshot.targets) == {"chosen"}
        assert all(other_pid not in t.pids for t in snapshot.targets)
    finally:
        cluster.stop()


def test_a_broken_watch_reconnects_and_changes_are_seen_again(cluster):
    first_id, _, _ = cluster.container()
    cluster.api.put_pod(make_pod("before", NODE, {"app": first_id}))
    cluster.targets_when(lambda ts: pods_of(ts) == {"before"})
    assert cluster.api.wait_for_watches(1)

    cluster.api.break_watches()
    assert cluster.api.wait_for_watches(2), "the watch was not re-established"
    # Counted as a failure (the stream died mid-chunk), not as a watch that ended normally.
    assert restarts(cluster.metrics, reasons={"ended"}) == 0
    assert restarts(cluster.metrics) >= 1
    second_id, _, _ = cluster.container()
    cluster.api.put_pod(make_pod("after", NODE, {"app": second_id}))
    cluster.targets_when(lambda ts: pods_of(ts) == {"before", "after"})


def test_an_expired_resource_version_leads_to_a_fresh_list(cluster):
    first_id, _, _ = cluster.container()
    second_id, _, _ = cluster.container()
    cluster.api.put_pod(make_pod("old", NODE, {"app": first_id}))
    cluster.targets_when(lambda ts: pods_of(ts) == {"old"})
    assert cluster.api.wait_for_watches(1)

    # The history is compacted and the watch ends: the watcher's resourceVersion is gone (410),
    # so it lists again and sees the pods that changed meanwhile.
    cluster.api.forget_history()
    cluster.api.end_watches()
    assert cluster.api.wait_for_watches(2)
    cluster.api.delete_pod("default", "old")
    cluster.api.put_pod(make_pod("new", NODE, {"app": second_id}))
    cluster.targets_when(lambda ts: pods_of(ts) == {"new"})
    assert restarts(cluster.metrics, reasons={"gone"}) >= 1
    assert cluster.api.list_requests >= 2


def test_only_running_containers_count():
    pod = make_pod("p", NODE, {"app": "1" * 64, "waiting": "2" * 64})
    pod["status"]["containerStatuses"][1]["state"] = {"waiting": {"reason": "CrashLoopBackOff"}}
    assert [c.name for c in running_containers(pod)] == ["app"]
    assert running_containers(pod)[0].container_id == "1" * 64


def test_outside_a_cluster_one_warning_and_discovery_goes_on(monkeypatch, caplog):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with caplog.at_level(logging.WARNING, logger="test.discovery"):
        assert load_api_client("", log) is None
    assert len([r for r in caplog.records if "Kubernetes discovery is off" in r.message]) == 1
    settings = discovery_settings(kubernetes="true")
    snapshot = Discovery(settings, log, Metrics("test"), pod_watcher=None).snapshot()
    assert snapshot.targets == () and snapshot.filtering is False


def test_an_unreachable_api_leaves_kubernetes_inactive(tmp_path):
    with socket.socket() as probe:  # a port nothing listens on once the probe is closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", f"http://127.0.0.1:{port}")
    metrics = Metrics("test")
    watcher = start_pod_watcher(kubeconfig, NODE, "", log, metrics)
    try:
        time.sleep(0.5)
        assert not watcher.synced.is_set()
        settings = discovery_settings(kubernetes="true", kubeconfig=kubeconfig)
        snapshot = Discovery(settings, log, metrics, pod_watcher=watcher).snapshot()
        assert snapshot.filtering is False
        assert restarts(metrics) >= 1
    finally:
        watcher.stop()


def restarts(metrics: Metrics, reasons: set[str] | None = None) -> float:
    return sum(value for name, labels, value in metrics.snapshot()
               if name == "test_kubernetes_watch_restarts_total"
               and (reasons is None or labels["reason"] in reasons))
