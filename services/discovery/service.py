"""The discovery loop: scan the sources, publish the whole set of targets on every change, to
every subscriber that joins, and rarely otherwise; send heartbeats; stop on SIGTERM."""

from __future__ import annotations

import logging
import math
import time

import zmq

from services import runtime, wire
from services.discovery import cgroups, sampling
from services.discovery.kubernetes import PodWatcher, container_targets, start_pod_watcher
from services.discovery.systemd import SystemdUnits
from services.discovery.targets import Snapshot, assemble
from services.settings import Settings

# Processes come and go between pod events and unit restarts; a scan every 2 s keeps the
# collector's filter within its 2 s budget of a new container's first process while reading
# /proc/*/cgroup only half as often as every second would.
RESCAN_SECONDS = 2.0
# The socket is an XPUB: a subscriber that connects (at start-up, after a restart, a tap) is
# seen joining and gets the snapshot at once, so repeating it on a timer only guards against a
# message lost at the high-water mark, which a snapshot this small and rare does not reach. A
# repeat used to go out every 5 s; each woke discovery, the collector and the aggregator.
REPUBLISH_SECONDS = 60.0
# Joins within this long of a publish wait for the next one: a peer subscribing over and over
# cannot make discovery publish more than a few times a second.
JOIN_GAP_SECONDS = 0.2
# The loop sleeps until its next scan, publish or heartbeat; subscriptions, pod watch events
# and the stop wake it sooner.
MAX_SLEEP_SECONDS = 5.0
# With Kubernetes configured, the first snapshot waits this long for the first pod list: until
# then we cannot tell a node with pods from a plain host, and guessing "plain host" would
# profile every process for a moment.
FIRST_LIST_WAIT_SECONDS = 3.0


class Discovery:
    """Builds a Snapshot from the active sources."""

    def __init__(self, settings: Settings, log: logging.Logger, metrics: runtime.Metrics,
                 pod_watcher: PodWatcher | None = None, use_dbus: bool = True):
        self.settings = settings
        self.metrics = metrics
        self.mounts = cgroups.find_mounts(settings.cgroup_path)
        self.pod_watcher = pod_watcher
        self.units = (SystemdUnits(settings.systemd_units, settings.node, self.mounts, log,
                                   metrics, use_dbus=use_dbus)
                      if settings.systemd_units else None)

    def snapshot(self) -> Snapshot:
        started = time.monotonic()
        kubernetes = None
        if self.pod_watcher is not None and self.pod_watcher.synced.is_set():
            scan = cgroups.scan_containers(self.settings.proc_path)
            kubernetes = container_targets(self.pod_watcher.containers(), scan,
                                           self.mounts.unified, self.settings.node)
        systemd = self.units.targets() if self.units is not None else None
        assembled = assemble(kubernetes, systemd, self.settings.host_processes)
        kept = tuple(sampling.sample(assembled.targets, self.settings.sampling_ratio))
        self.metrics.set("scan_seconds", time.monotonic() - started)
        self.metrics.inc("scans_total")
        self.metrics.set("targets", len(kept))
        self.metrics.set("targets_sampled_out", len(assembled.targets) - len(kept))
        return Snapshot(targets=kept, filtering=assembled.filtering)


def run(settings: Settings, stop: runtime.StopFlag, log: logging.Logger,
        metrics: runtime.Metrics) -> None:
    runtime.prepare_run_dir(settings.run_dir)
    address = wire.endpoint(settings.run_dir, wire.ENDPOINT_DISCOVERY)
    ctx = zmq.Context()
    sock = runtime.pub_socket(ctx, [address], subscriptions=True)
    publisher = wire.Publisher("discovery")
    heartbeat = runtime.Heartbeat("discovery", publisher, metrics)
    errors = runtime.RateLimitedLog(log)

    pod_watcher = None
    if settings.kubernetes:
        pod_watcher = start_pod_watcher(settings.kubeconfig, settings.node,
                                        settings.pod_label_selector, log, metrics)
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)  # subscriptions
    poller.register(stop.fileno(), zmq.POLLIN)
    if pod_watcher is not None:
        poller.register(pod_watcher.changed.fileno(), zmq.POLLIN)
    discovery = Discovery(settings, log, metrics, pod_watcher)
    log.info("discovery publishing on %s (kubernetes: %s, systemd units: %s)", address,
             "configured" if pod_watcher else "off", ",".join(settings.systemd_units) or "none")

    started = time.monotonic()
    next_scan = started
    next_publish = math.inf
    last_publish = -math.inf
    last_body = None
    try:
        while not stop.is_set():
            now = time.monotonic()
            first_list_due = started + FIRST_LIST_WAIT_SECONDS
            waiting_for_pods = (pod_watcher is not None and not pod_watcher.synced.is_set()
                                and now < first_list_due)
            pods_changed = pod_watcher is not None and pod_watcher.changed.is_set()
            body = None
            if not waiting_for_pods and (now >= next_scan or pods_changed):
                if pod_watcher is not None:
                    pod_watcher.changed.clear()
                # With no source (a plain host: every process profiled, one target each) the
                # snapshot cannot change: one scan, then only joins, repeats and heartbeats.
                static = pod_watcher is None and discovery.units is None
                next_scan = math.inf if static else now + RESCAN_SECONDS
                try:
                    body = discovery.snapshot().to_wire()
                except Exception as e:  # a scan must never end the service
                    metrics.inc("scan_errors_total", reason=type(e).__name__)
                    errors.warning("scan", f"scan failed: {e!r}")
            if body is not None and body != last_body:
                log.info("targets: %d (filtering: %s)", len(body["targets"]), body["filtering"])
                last_body = body
                next_publish = now
            if _joined(sock):
                metrics.inc("subscriber_joins_total")
                next_publish = min(next_publish, max(now, last_publish + JOIN_GAP_SECONDS))
            if last_body is not None and now >= next_publish:
                frames = publisher.encode("targets", last_body)
                if runtime.send_nowait(sock, frames, metrics, socket_name="discovery"):
                    metrics.inc("snapshots_published_total")
                last_publish = now
                next_publish = now + REPUBLISH_SECONDS
            if heartbeat.due():
                heartbeat.send(sock)
            due = min(next_scan, heartbeat.next_due,
                      next_publish if last_body is not None else math.inf,
                      first_list_due if waiting_for_pods else math.inf)
            poller.poll(runtime.poll_ms(due, cap=MAX_SLEEP_SECONDS))
    finally:
        log.info("discovery stopping")
        if pod_watcher is not None:
            pod_watcher.stop()
        # Nothing it sends needs flushing (a subscriber that joins gets the snapshot again,
        # heartbeats come anyway), so the stop never waits on a peer. Once, in a full CI run
        # with a subscriber still connected, a stop took over 5 s with nothing logged after
        # the last snapshot (not reproduced since; "stopping" above now tells the two halves
        # apart): the old close lingered 0.5 s and then waited for the context to terminate.
        sock.close(linger=0)
        ctx.destroy(linger=0)
        runtime.unlink_endpoint(address)
        log.info("discovery stopped")


def _joined(sock: zmq.Socket) -> bool:
    """A subscriber joined that wants targets (its topic is a prefix of ``targets``: a tap that
    takes everything too). Reads every subscription waiting."""
    return any(wire.TOPIC_TARGETS.startswith(topic) for topic in runtime.new_subscriptions(sock))
