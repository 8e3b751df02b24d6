"""The shipper's loops: profiles in (ROUTER -> spool -> ack) and profiles out (spool -> store).

Two threads, so that a slow or unreachable store never delays an acknowledgement:

- the main thread reads the profile channel, writes each profile to the spool and acks it (a
  batch once all of its profiles are spooled), and publishes the heartbeat;
- the sending thread, every ``interval``, sends the spooled profiles in batches, oldest first,
  and removes them from the spool once the store took them. A retryable failure waits with
  exponential backoff and jitter and tries the same batch again; a permanent one (the store will
  never take it: bad token, invalid request) is logged in one clear line, counted, and the
  batch is dropped, so that one bad batch cannot stop shipping forever.

With no ``--store-address`` profiles are acknowledged and discarded: they stay local (the UI
shows them), which is logged once at start.
"""

from __future__ import annotations

import logging
import os
import threading

import zmq

from services import runtime, wire
from services.profile_channel import Delivery, ProfileInbox
from services.settings import Settings
from services.shipper.debuginfo import DebuginfoUploader
from services.shipper.spool import Spool, SpoolEntry, SpoolError
from services.shipper.store_client import (Backoff, BearerToken, ConprofWriter, ParcaWriter,
                                           StoreConnection, StoreError, Transport)

log = logging.getLogger("parca_agent.shipper")

SEND_INTERVAL = 1.0  # seconds between sends: a few windows' worth of batching at most
BATCH_MAX_PROFILES = 100
# Stays under gRPC's default 4 MiB receive limit that a store may keep; a larger profile still
# goes, alone in its batch.
BATCH_MAX_BYTES = 3 * 1024 * 1024
RECEIVE_BURST = 200  # profiles handled before the heartbeat and stop flag are checked again
STOP_JOIN_SECONDS = 2.0  # the sending thread's time to finish once its calls are cancelled


class Shipper:
    def __init__(self, settings: Settings, metrics: runtime.Metrics, *,
                 interval: float = SEND_INTERVAL, backoff: Backoff | None = None,
                 root_certificates: bytes | None = None, max_reconnect_backoff_ms: int = 5000,
                 debuginfo_retry_after: float | None = None, ctx: zmq.Context | None = None):
        self.settings = settings
        self.metrics = metrics
        self.interval = interval
        self.backoff = backoff or Backoff()
        self.ctx = ctx or zmq.Context.instance()
        self.spool: Spool | None = None
        self.connection: StoreConnection | None = None
        self.debuginfo: DebuginfoUploader | None = None
        self._warn = runtime.RateLimitedLog(log)
        self._sending_stopped = threading.Event()
        # Set when a profile is spooled: the sending thread sleeps on it while the spool is empty.
        self._work = threading.Event()
        if settings.store_address:
            self.spool = Spool(os.path.join(settings.cache_dir, "spool"),
                               settings.spool_max_bytes, metrics)
            transport = Transport(settings.store_address, insecure=settings.insecure,
                                  insecure_skip_verify=settings.insecure_skip_verify,
                                  root_certificates=root_certificates,
                                  max_reconnect_backoff_ms=max_reconnect_backoff_ms)
            self.connection = StoreConnection(
                transport, BearerToken(settings.bearer_token, settings.bearer_token_file))
            writer_class = ConprofWriter if settings.store_protocol == "conprof" else ParcaWriter
            self.writer = writer_class(self.connection)
            # Conprof has no debuginfo service.
            if settings.debuginfo_upload and settings.store_protocol == "parca":
                extra = {} if debuginfo_retry_after is None else {
                    "retry_after": debuginfo_retry_after}
                self.debuginfo = DebuginfoUploader(self.connection, settings.cache_dir, metrics,
                                                   **extra)

    # -- the main thread ----------------------------------------------------------------------

    def run(self, stop: runtime.StopFlag) -> None:
        runtime.prepare_run_dir(self.settings.run_dir)
        inbox = ProfileInbox(self.settings.run_dir, self.metrics, ctx=self.ctx)
        pub = runtime.pub_socket(self.ctx, [wire.endpoint(self.settings.run_dir,
                                                          wire.ENDPOINT_SHIPPER_PUB)])
        heartbeat = runtime.Heartbeat("shipper", wire.Publisher("shipper"), self.metrics)
        sender = None
        if self.spool is None:
            log.info("no --store-address: profiles stay local (the UI shows them) and are not "
                     "shipped")
        else:
            scheme = "plaintext" if self.settings.insecure else "TLS"
            log.info("shipping profiles to %s (%s, %s protocol); spool %s holds %d profiles",
                     self.settings.store_address, scheme, self.settings.store_protocol,
                     self.spool.directory, len(self.spool))
            stop.wake_also(self._work)
            sender = threading.Thread(target=self._send_loop, args=(stop,), name="send",
                                      daemon=True)
            sender.start()
        poller = zmq.Poller()
        poller.register(inbox.sock, zmq.POLLIN)
        poller.register(stop.fileno(), zmq.POLLIN)
        try:
            while not stop.is_set():
                if poller.poll(runtime.poll_ms(heartbeat.next_due)):
                    budget = RECEIVE_BURST  # counted in profiles: a message may hold hundreds
                    while budget > 0 and not stop.is_set():
                        delivery = inbox.receive()
                        if delivery is None:
                            break
                        self._take(inbox, delivery)
                        budget -= max(1, len(delivery.profiles))
                if heartbeat.due():
                    heartbeat.send(pub)
        finally:
            self._shut_down(sender)
            inbox.close()
            pub.close(linger=runtime.LINGER_MS)
            runtime.unlink_endpoint(wire.endpoint(self.settings.run_dir,
                                                  wire.ENDPOINT_SHIPPER_PUB))

    def _take(self, inbox: ProfileInbox, delivery: Delivery) -> None:
        """Spool a message's profiles and acknowledge it; without a store, acknowledge and
        discard. Not acknowledged when one cannot be spooled: the aggregator resends it all,
        and what was spooled already is recognized by id."""
        count = len(delivery.profiles)
        self.metrics.inc("profiles_received_total", count)
        if self.spool is None:
            self.metrics.inc("profiles_discarded_total", count)
            inbox.ack(delivery.peer, delivery.ack_id)
            return
        for received in delivery.profiles:
            try:
                outcome = self.spool.add(received.message.body["id"], received.frames)
            except SpoolError as e:
                self._warn.warning("spool_write", f"cannot spool a profile: {e}")
                return
            if outcome == "duplicate":
                self.metrics.inc("profiles_duplicate_total")
            else:
                self._work.set()
        inbox.ack(delivery.peer, delivery.ack_id)

    def _shut_down(self, sender: threading.Thread | None) -> None:
        if self.connection is not None:
            self.connection.close()  # cancels a call in flight so the sender ends now
        if self.debuginfo is not None:
            self.debuginfo.close()
        if sender is not None:
            sender.join(STOP_JOIN_SECONDS)

    # -- the sending thread -------------------------------------------------------------------

    def _send_loop(self, stop: runtime.StopFlag) -> None:
        delay = self.interval
        while not stop.wait(delay):
            try:
                delay = self._send_spooled(stop)
            except Exception:  # a bug here must not end shipping for the life of the process
                self.metrics.inc("ship_failures_total", code="error")
                log.exception("unexpected error while shipping; retrying")
                delay = self.backoff.next_delay()
                continue
            if not len(self.spool):
                # All sent (or dropped): sleep until the next profile is spooled (or the stop),
                # then give it `interval` to gather company into one batch.
                self._work.wait()
                self._work.clear()

    def _send_spooled(self, stop: runtime.StopFlag) -> float:
        """Send batches until the spool is empty or a send fails; return the wait before next."""
        assert self.spool is not None
        while not stop.is_set():
            batch = self.spool.oldest(BATCH_MAX_PROFILES, BATCH_MAX_BYTES)
            if not batch:
                return self.interval
            loaded = [(entry, self.spool.load(entry)) for entry in batch]
            profiles = [(entry, msg.body) for entry, msg in loaded if msg is not None]
            if not profiles:
                continue  # all were corrupt or dropped meanwhile, and are gone now
            try:
                self.writer.write([body for _, body in profiles])
            except StoreError as e:
                self.metrics.inc("ship_failures_total", code=e.code)
                if e.retryable:
                    wait = self.backoff.next_delay()
                    self._warn.warning("retry_" + e.code,
                                       f"cannot ship {len(profiles)} profiles: {e}; "
                                       f"{len(self.spool)} profiles spooled, retrying in "
                                       f"{wait:.1f}s")
                    return wait
                self._drop(batch, len(profiles), e)
                return self.interval  # the next batch after a pause: a new token may come
            self.spool.remove(batch)
            self.backoff.reset()
            self.metrics.inc("profiles_shipped_total", len(profiles))
            if self.debuginfo is not None:
                for _, body in profiles:
                    self.debuginfo.observe(body["pprof"])
        return self.interval

    def _drop(self, batch: list[SpoolEntry], count: int, error: StoreError) -> None:
        assert self.spool is not None
        self.spool.remove(batch)
        self.metrics.inc("profiles_dropped_total", count, reason=error.code)
        log.error("dropped %d profiles: %s; not retrying them", count, error)

