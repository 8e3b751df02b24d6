"""The aggregator's loop: the raw stream and discovery's targets in, one pprof profile per
target and window out, to the shipper (acknowledged, never dropped) and the UI (PUB), a window's
profiles batched into as few messages as the batch bounds allow."""

from __future__ import annotations

import logging
import math
import os
import time

import zmq

from services import runtime, wire
from services.aggregator.symbol_store import SymbolStore
from services.aggregator.symbols import Symbolizer
from services.aggregator.windows import WindowAggregator
from services.profile_channel import ProfileSender
from services.settings import Settings

log = logging.getLogger("parca_agent.aggregator")

# Seconds: the most the loop sleeps, however far its next piece of work is (every piece has a
# due time it sleeps to; this only bounds the harm of a wrong one, e.g. after a clock step).
# 1 s, as it was, woke it once a second for nothing: ~0.1 ms/s, more on a busy host.
MAX_SLEEP = 5.0
# The collector drains on wall-clock multiples that the heartbeat's fall on too; its batch
# reaches us within this long under load, and our heartbeat goes in that wake-up.
HEARTBEAT_LAG = 0.5
# After a gap in the collector's process messages the aggregator subscribes to them again: the
# collector takes a subscription as a join and tells every process again (within ~2 s). Not
# more often than this: one catch-up covers every message lost before it.
CATCH_UP_EVERY = 10.0


class Aggregator:
    def __init__(self, settings: Settings, metrics: runtime.Metrics,
                 ctx: zmq.Context | None = None):
        self.settings = settings
        self.metrics = metrics
        self.ctx = ctx or zmq.Context.instance()
        runtime.prepare_run_dir(settings.run_dir)
        run_dir = settings.run_dir
        self.inputs = runtime.sub_socket(
            self.ctx, [wire.endpoint(run_dir, wire.ENDPOINT_COLLECTOR)],
            [wire.TOPIC_SAMPLES, wire.TOPIC_PROCESS])
        self.targets = runtime.sub_socket(
            self.ctx, [wire.endpoint(run_dir, wire.ENDPOINT_DISCOVERY)], [wire.TOPIC_TARGETS])
        self.address = wire.endpoint(run_dir, wire.ENDPOINT_AGGREGATOR)
        self.pub = runtime.pub_socket(self.ctx, [self.address])
        self.shipper = ProfileSender(run_dir, ctx=self.ctx, metrics=metrics)
        self.publisher = wire.Publisher("aggregator")
        # Its heartbeat waits up to HEARTBEAT_LAG for the collector's batch of the same
        # wall-clock multiple to wake it (see runtime.Heartbeat).
        self.heartbeat = runtime.Heartbeat("aggregator", self.publisher, metrics,
                                           lag=HEARTBEAT_LAG)
        self.gaps = wire.GapCounter()
        self._caught_up = -math.inf  # when process metadata was last asked for again
        self.bad_log = runtime.RateLimitedLog(log)
        self.windows = WindowAggregator(settings.node, settings.profiling_duration,
                                        settings.sampling_frequency,
                                        Symbolizer(metrics=metrics,
                                                   store=_symbol_store(settings, metrics)),
                                        metrics,
                                        sampling_ratio=settings.sampling_ratio)

    def run(self, stop: runtime.StopFlag) -> None:
        log.info("building %gs profiles from %s", self.settings.profiling_duration,
                 wire.endpoint(self.settings.run_dir, wire.ENDPOINT_COLLECTOR))
        poller = zmq.Poller()
        poller.register(self.inputs, zmq.POLLIN)
        poller.register(self.targets, zmq.POLLIN)
        poller.register(self.shipper.socket, zmq.POLLIN)  # acks
        poller.register(stop.fileno(), zmq.POLLIN)
        while not stop.is_set():
            # Sleep until input, an ack, or the next window close, resend or heartbeat.
            due = min(self._next_close_due(), self.shipper.next_resend_due(),
                      self.heartbeat.next_due)
            ready = dict(poller.poll(runtime.poll_ms(due, cap=MAX_SLEEP)))
            if self.targets in ready:
                self._drain(self.targets)
            if self.inputs in ready:
                self._drain(self.inputs, limit=200)
            self._publish(self.windows.close_due())
            self.shipper.poll()
            if self.heartbeat.due():
                self.metrics.set("windows_open", len(self.windows.windows))
                self.metrics.set("processes_known", len(self.windows.processes))
                self.heartbeat.send(self.pub)
        # Windows still open hold samples already taken: build them rather than lose them.
        self._publish(self.windows.close_due(force=True))
        deadline = time.monotonic() + 1.0  # within supervisord's stop wait
        while self.shipper.pending() and time.monotonic() < deadline:
            self.shipper.poll()
            time.sleep(0.05)

    def _next_close_due(self) -> float:
        """When (monotonic) the oldest open window is due to close; inf with none open."""
        due_ns = self.windows.next_close_ns()
        if due_ns is None:
            return math.inf
        return time.monotonic() + (due_ns - self.windows.clock()) / 1e9

    def _drain(self, sock: zmq.Socket, limit: int = 1000) -> None:
        for _ in range(limit):
            lost = self.gaps.lost
            msg = runtime.receive(sock, self.metrics, self.gaps, self.bad_log)
            if msg is None:
                return
            if self.gaps.lost > lost and msg.topic == wire.TOPIC_PROCESS and sock is self.inputs:
                self._catch_up_processes()
            try:
                if msg.type == "samples":
                    self.windows.add_samples(msg.body)
                elif msg.type == "process":
                    self.windows.add_process(msg.body)
                elif msg.type == "targets":
                    self.windows.apply_targets(msg.body)
            except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
                # Right frames, wrong contents: count it and read on.
                self.metrics.inc("messages_malformed_total", reason=f"bad_{msg.type}")
                self.bad_log.warning(f"bad_{msg.type}", f"dropped a bad {msg.type} message: "
                                     f"{type(e).__name__}")

    def _catch_up_processes(self) -> None:
        """Process messages were lost (the collector publishes one when a process first shows,
        and repeats it only every few minutes): subscribe to them again, which the collector
        answers with every process it knows (docs/wire.md, `process`). A SUB socket passes a
        repeated subscription on, and the collector's XPUB is verbose: it sees each one."""
        now = time.monotonic()
        if now - self._caught_up < CATCH_UP_EVERY:
            return
        self._caught_up = now
        self.inputs.setsockopt(zmq.SUBSCRIBE, wire.TOPIC_PROCESS)
        self.metrics.inc("process_catch_ups_total")
        log.info("process messages were lost: asked the collector for every process again")

    def _publish(self, profiles: list[dict]) -> None:
        """To the shipper (kept until acknowledged) and the UI, in batches: the same frames."""
        if not profiles:
            return
        for frames in self.shipper.send_many(profiles):
            runtime.send_nowait(self.pub, frames, self.metrics, "aggregator")
        log.debug("%d profiles, %d samples", len(profiles), sum(p["samples"] for p in profiles))

    def close(self) -> None:
        self.shipper.close()
        for sock in (self.inputs, self.targets, self.pub):
            sock.close()
        runtime.unlink_endpoint(self.address)


def _symbol_store(settings: Settings, metrics: runtime.Metrics) -> SymbolStore | None:
    """Parsed symbol tables kept across restarts in <cache-dir>/symbols; without it (a cache
    directory this user cannot write) the aggregator parses every file again after a restart."""
    directory = os.path.join(settings.cache_dir, "symbols")
    try:
        return SymbolStore(directory, metrics=metrics)
    except OSError as e:
        log.warning("no symbol store at %s (%s): symbol tables are parsed again on each start",
                    directory, e.strerror or e)
        return None
