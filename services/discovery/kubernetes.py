"""Kubernetes containers as targets, labeled ``node``, ``namespace``, ``pod``, ``container``,
``containerid`` (Parca Agent's names).

A thread lists the pods on this node (field selector ``spec.nodeName``, plus
``--pod-label-selector``) and then watches them, keeping the running containers of each pod; the
main loop reads them and finds each container's processes and cgroups from its id in
/proc/<pid>/cgroup. A broken watch is re-established with backoff from a fresh list, so the set is
whole again after any outage.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from services.discovery import cgroups
from services.discovery.targets import Target
from services.runtime import Metrics, RateLimitedLog, Wakeup

# The API server ends a watch after this many seconds; we then watch again from the last
# resourceVersion. Servers cap it themselves (kube-apiserver: 30-60 min); a few minutes also
# bounds how long a connection that died silently can go unnoticed.
WATCH_TIMEOUT_SECONDS = 300
# Client-side timeouts: (connect, read). A watch's read timeout is longer than the server's.
LIST_REQUEST_TIMEOUT = (5, 30)
WATCH_REQUEST_TIMEOUT = (5, WATCH_TIMEOUT_SECONDS + 30)
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0
# A watch that ends sooner than this is retried with backoff, so that a server that keeps
# closing streams at once is not hammered; one that lasted longer resets the backoff.
WATCH_MIN_HEALTHY_SECONDS = 1.0


@dataclass(frozen=True)
class Container:
    namespace: str
    pod: str
    name: str
    container_id: str  # without the runtime's scheme

    def labels(self, node: str) -> dict[str, str]:
        return {"node": node, "namespace": self.namespace, "pod": self.pod,
                "container": self.name, "containerid": self.container_id}


def running_containers(pod: dict[str, Any]) -> list[Container]:
    """The running containers of a pod, from the API's JSON (init and ephemeral ones too: while
    they run they do work worth profiling)."""
    meta = pod.get("metadata") or {}
    status = pod.get("status") or {}
    found = []
    for key in ("initContainerStatuses", "containerStatuses", "ephemeralContainerStatuses"):
        for cs in status.get(key) or []:
            container_id = cs.get("containerID") or ""
            if not container_id or "running" not in (cs.get("state") or {}):
                continue
            found.append(Container(namespace=meta.get("namespace", ""), pod=meta.get("name", ""),
                                   name=cs.get("name", ""),
                                   container_id=cgroups.strip_runtime_scheme(container_id)))
    return found


def load_api_client(kubeconfig: str, log: logging.Logger):
    """An ApiClient from --kubeconfig or the pod's service account; None (after one warning)
    when neither is there, e.g. a host outside any cluster."""
    from kubernetes import client, config  # imported late: it costs 24 MB and a second

    configuration = client.Configuration()
    try:
        if kubeconfig:
            config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
        else:
            config.load_incluster_config(client_configuration=configuration)
    except Exception as e:  # ConfigException, a missing or malformed file, ...
        where = kubeconfig or "the in-cluster service account"
        log.warning("Kubernetes discovery is off: no API configuration from %s (%s); "
                    "pass --kubernetes=false to silence this", where, e)
        return None
    return client.ApiClient(configuration)


class PodWatcher(threading.Thread):
    """Lists and watches this node's pods; ``containers()`` is the running set.

    ``synced`` is set after the first successful list: from then on Kubernetes discovery is
    active. ``changed`` is set whenever the set of running containers changed.
    """

    def __init__(self, api_client, node: str, label_selector: str, log: logging.Logger,
                 metrics: Metrics):
        super().__init__(name="pod-watcher", daemon=True)
        from kubernetes import client, watch

        self._core = client.CoreV1Api(api_client)
        self._watch_factory = watch.Watch
        self._watch = None
        self.node = node
        self.label_selector = label_selector
        self.log = log
        self.rate_log = RateLimitedLog(log, interval=30.0)
        self.metrics = metrics
        self.synced = threading.Event()
        self.changed = Wakeup()  # the discovery loop polls it with its socket
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._pods: dict[str, list[Container]] = {}  # by "namespace/name"

    def containers(self) -> list[Container]:
        with self._lock:
            return [c for pod in self._pods.values() for c in pod]

    def stop(self) -> None:
        self._stopping.set()
        if self._watch is not None:
            self._watch.stop()

    def _selectors(self) -> dict[str, str]:
        selectors = {"field_selector": f"spec.nodeName={self.node}"}
        if self.label_selector:
            selectors["label_selector"] = self.label_selector
        return selectors

    def run(self) -> None:
        delay = BACKOFF_FIRST
        version = None  # None: list before watching
        while not self._stopping.is_set():
            started = time.monotonic()
            try:
                if version is None:
                    version = self._list()
                version = self._watch_from(version)
                reason = "ended"
            except Exception as e:  # connection errors, HTTP errors, 410 Gone, bad JSON
                if self._stopping.is_set():
                    break
                # Whatever broke, only a fresh list is sure to make the set whole again.
                version = None
                reason = "gone" if getattr(e, "status", None) == 410 else type(e).__name__
                self.rate_log.warning(reason, f"Kubernetes pod list/watch failed ({e}); "
                                              "listing again")
            self.metrics.inc("kubernetes_watch_restarts_total", reason=reason)
            if time.monotonic() - started >= WATCH_MIN_HEALTHY_SECONDS:
                delay = BACKOFF_FIRST
                if reason == "ended":
                    continue  # the server's watch timeout: watch again at once
            self._stopping.wait(delay)
            delay = min(delay * 2, BACKOFF_MAX)

    def _list(self) -> str:
        """A full list replaces what we knew; returns the resourceVersion to watch from."""
        response = self._core.list_pod_for_all_namespaces(
            **self._selectors(), _preload_content=False, _request_timeout=LIST_REQUEST_TIMEOUT)
        # Raw JSON rather than the client's models: they are slow and refuse objects that lack
        # fields the models call required, and we need five fields.
        body = json.loads(response.data)
        pods = {}
        for pod in body.get("items") or []:
            pods[_pod_key(pod)] = running_containers(pod)
        first = not self.synced.is_set()
        self._replace(pods, first)
        self.metrics.inc("kubernetes_lists_total")
        if first:
            self.log.info("Kubernetes discovery active: %d pods on node %s", len(pods), self.node)
        return (body.get("metadata") or {}).get("resourceVersion", "")

    def _watch_from(self, version: str) -> str:
        """Follow changes until the stream ends; returns the last resourceVersion seen.
        An ERROR event (e.g. 410 Gone: our version is too old) raises, and we list again."""
        # return_type=object keeps each event's pod as plain JSON (see _list for why), and unlike
        # deserialize=False it keeps the client's handling of ERROR events (410 Gone raises).
        self._watch = self._watch_factory(return_type=object)
        stream = self._watch.stream(
            self._core.list_pod_for_all_namespaces, **self._selectors(),
            resource_version=version, allow_watch_bookmarks=True,
            timeout_seconds=WATCH_TIMEOUT_SECONDS, _request_timeout=WATCH_REQUEST_TIMEOUT)
        for event in stream:
            pod = event.get("object") or {}
            version = (pod.get("metadata") or {}).get("resourceVersion") or version
            kind = event.get("type")
            self.metrics.inc("kubernetes_watch_events_total", type=str(kind))
            if kind in ("ADDED", "MODIFIED"):
                self._update(_pod_key(pod), running_containers(pod))
            elif kind == "DELETED":
                self._update(_pod_key(pod), None)
        return version

    def _replace(self, pods: dict[str, list[Container]], first: bool = False) -> None:
        with self._lock:
            changed = pods != self._pods
            self._pods = pods
            self.metrics.set("kubernetes_pods", len(pods))
        # In this order: the loop wakes on changed and must find the pods and synced set.
        self.synced.set()
        if changed or first:
            self.changed.set()

    def _update(self, key: str, containers: list[Container] | None) -> None:
        with self._lock:
            before = self._pods.get(key)
            if containers is None:
                self._pods.pop(key, None)
            else:
                self._pods[key] = containers
            self.metrics.set("kubernetes_pods", len(self._pods))
        if before != containers:
            self.changed.set()


def _pod_key(pod: dict[str, Any]) -> str:
    meta = pod.get("metadata") or {}
    return f"{meta.get('namespace', '')}/{meta.get('name', '')}"


def start_pod_watcher(kubeconfig: str, node: str, label_selector: str, log: logging.Logger,
                      metrics: Metrics) -> PodWatcher | None:
    api_client = load_api_client(kubeconfig, log)
    if api_client is None:
        return None
    watcher = PodWatcher(api_client, node, label_selector, log, metrics)
    watcher.start()
    return watcher


def container_targets(containers: list[Container], scan: dict[str, cgroups.ContainerCgroups],
                      unified_mount: str | None, node: str) -> list[Target]:
    """One target per running container whose processes the scan found. The cgroup ids are
    the container's v2 directories and those below them; on a v1-only host there are none and
    the pids are what the collector filters on."""
    found = []
    for container in containers:
        seen = scan.get(container.container_id)
        if seen is None or not seen.pids:
            continue  # not started yet, or it runs on no process we can see
        ids: set[int] = set()
        if unified_mount is not None:
            for path in seen.unified_paths:
                ids |= cgroups.cgroup_ids(cgroups.in_mount(unified_mount, path))
        found.append(Target(labels=container.labels(node), cgroup_ids=frozenset(ids),
                            pids=frozenset(seen.pids)))
    return found
