"""What every service shares: logging, the stop flag, counters, heartbeats and sockets.

Signal handlers only set the stop flag. The flag also wakes what a service sleeps in (a pipe
its ZeroMQ poller watches, events it waits on), so loops sleep until their next piece of work
is due — an idle agent wakes rarely — and still end at once on SIGTERM, after they flushed and
closed their sockets.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import signal
import sys
import threading
import time
from collections import defaultdict
from typing import Iterable

import zmq

from services import wire
from services.parent_death import die_with_parent
from services.settings import Settings, SettingsError, load

# Seconds between heartbeats; the UI calls a service dead after missing about three. Each one
# wakes its service and the UI: on an idle agent they are a good part of the CPU it uses.
HEARTBEAT_INTERVAL = 5.0
ZERO_COPY_BYTES = 512 * 1024
LINGER_MS = 500  # bounded: a stopping service never waits long for a peer that is gone
# Sockets are created group-readable and -writable only: the run directory's group (the agent's)
# decides who may connect to the raw stream and the internal endpoints.
SOCKET_UMASK = 0o007

log = logging.getLogger("parca_agent")


def setup_logging(service: str, level: str) -> logging.Logger:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(
        f"%(asctime)s {service} %(levelname)s %(message)s", "%Y-%m-%dT%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    return logging.getLogger(f"parca_agent.{service}")


def load_settings_or_exit(service: str, argv: list[str] | None = None) -> Settings:
    try:
        return load(argv, prog=f"parca-agent-{service}", check_files=False)
    except SettingsError as e:
        print(f"parca-agent-{service}: {e}", file=sys.stderr)
        raise SystemExit(2) from None


class StopFlag:
    """Set by SIGTERM or SIGINT; loops check it between polls.

    ``fileno()`` turns readable when it is set: register it in a zmq.Poller to sleep long and
    still wake at once. ``wake_also(event)`` sets another event with it, for a thread that
    sleeps on that event.
    """

    def __init__(self) -> None:
        self._event = threading.Event()
        self._read_fd, self._write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._also: list[threading.Event] = []

    def install(self, supervised: bool = True) -> "StopFlag":
        """supervised: a service under supervisord, which stops with it (die_with_parent); a
        command run from a shell (`parca-agent tap`) is not, or a closing shell would stop it
        even under nohup."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.set())
        if supervised:
            die_with_parent()
        return self

    def set(self) -> None:
        self._event.set()
        for event in self._also:
            event.set()
        try:
            os.write(self._write_fd, b"x")
        except OSError:  # the pipe is full: it is readable already
            pass

    def wake_also(self, event: threading.Event) -> None:
        self._also.append(event)
        if self.is_set():
            event.set()

    def fileno(self) -> int:
        return self._read_fd

    def is_set(self) -> bool:
        return self._event.is_set()

    def wait(self, seconds: float | None) -> bool:
        return self._event.wait(seconds)


def settle_gc() -> None:
    """After start-up: move what was built so far (modules, tables) out of the collector's way
    and collect the young generation less often. A service allocates many short-lived
    containers per batch (ints, tuples, lists) and few cycles; with the defaults, collection
    took 7-10 % of the aggregator's CPU."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(20000, 20, 20)


class Wakeup:
    """A threading.Event that a ZeroMQ poller can sleep on too: ``fileno()`` is readable while
    it is set. For a loop that sleeps on sockets and must also wake when another thread has
    news (the pod watcher's "pods changed"), without waking on a timer to look."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._read_fd, self._write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        # set and clear under one lock: the pipe is readable exactly while the event is set,
        # or a poller could wake for a cleared event and find nothing to clear (a busy loop).
        self._lock = threading.Lock()

    def set(self) -> None:
        with self._lock:
            if self._event.is_set():
                return
            self._event.set()
            os.write(self._write_fd, b"x")

    def clear(self) -> None:
        with self._lock:
            if not self._event.is_set():
                return
            self._event.clear()
            os.read(self._read_fd, 16)

    def is_set(self) -> bool:
        return self._event.is_set()

    def wait(self, seconds: float | None) -> bool:
        return self._event.wait(seconds)

    def fileno(self) -> int:
        return self._read_fd


def poll_ms(deadline: float, cap: float = 5.0) -> int:
    """Milliseconds from now (monotonic) to ``deadline``, at least 0 and at most ``cap`` s;
    rounded up, so that a poll does not return just before its deadline and spin until it."""
    return math.ceil(max(0.0, min(deadline - time.monotonic(), cap)) * 1000)


class Metrics:
    """Counters and gauges by name and labels, sent in heartbeats, rendered by the UI."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self._values: dict[tuple[str, tuple[tuple[str, str], ...]], float] = defaultdict(float)
        self._lock = threading.Lock()

    def _key(self, name: str, labels: dict[str, str] | None):
        return (f"{self.prefix}_{name}", tuple(sorted((labels or {}).items())))

    def inc(self, name: str, amount: float = 1, **labels: str) -> None:
        with self._lock:
            self._values[self._key(name, labels)] += amount

    def set(self, name: str, value: float, **labels: str) -> None:
        with self._lock:
            self._values[self._key(name, labels)] = value

    def get(self, name: str, **labels: str) -> float:
        with self._lock:
            return self._values.get(self._key(name, labels), 0.0)

    def snapshot(self) -> list[list]:
        """``[[name, {labels}, value], ...]``: the heartbeat's ``metrics`` field."""
        with self._lock:
            return [[name, dict(labels), value] for (name, labels), value in self._values.items()]


class RateLimitedLog:
    """Logs a repeated problem at most once per interval, with how often it happened."""

    def __init__(self, logger: logging.Logger, interval: float = 10.0):
        self.logger = logger
        self.interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = defaultdict(int)

    def warning(self, key: str, message: str) -> None:
        now = time.monotonic()
        if now - self._last.get(key, -1e9) >= self.interval:
            extra = self._suppressed.pop(key, 0)
            suffix = f" (and {extra} more like it)" if extra else ""
            self.logger.warning("%s%s", message, suffix)
            self._last[key] = now
        else:
            self._suppressed[key] += 1


def prepare_run_dir(run_dir: str) -> None:
    """Create the run directory if it is missing; sockets inherit its group (setgid)."""
    os.makedirs(run_dir, exist_ok=True)


def bind(sock: zmq.Socket, address: str) -> None:
    """Bind, replacing a socket file left by a process that died without cleaning up."""
    if address.startswith("ipc://"):
        path = address[len("ipc://"):]
        if os.path.exists(path):
            os.unlink(path)
        old = os.umask(SOCKET_UMASK)
        try:
            sock.bind(address)
        finally:
            os.umask(old)
    else:
        sock.bind(address)


def unlink_endpoint(address: str) -> None:
    if address.startswith("ipc://"):
        try:
            os.unlink(address[len("ipc://"):])
        except FileNotFoundError:
            pass


def pub_socket(ctx: zmq.Context, addresses: Iterable[str], hwm: int = 1000,
               subscriptions: bool = False) -> zmq.Socket:
    """A PUB socket that never blocks its owner: a slow subscriber loses messages at the HWM.
    subscriptions=True makes it an XPUB that hands every subscription to its owner to read
    (``new_subscriptions``), even one a subscriber already made: a publisher can then tell a
    newcomer what it would otherwise only repeat on a timer."""
    sock = ctx.socket(zmq.XPUB if subscriptions else zmq.PUB)
    if subscriptions:
        sock.setsockopt(zmq.XPUB_VERBOSE, 1)
        # It reads from its peers now (a tap may be on the network): a subscription is a
        # topic, so anything large is a peer to drop.
        sock.setsockopt(zmq.MAXMSGSIZE, 4096)
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.LINGER, LINGER_MS)
    for a in addresses:
        bind(sock, a)
    return sock


def new_subscriptions(sock: zmq.Socket, limit: int = 1000) -> list[bytes]:
    """The topics subscribed to since the last call, read from a ``subscriptions`` socket.
    Anything else a peer sends (an XSUB may send any frame) is read and dropped."""
    topics = []
    for _ in range(limit):
        try:
            frame = sock.recv(flags=zmq.NOBLOCK)
        except zmq.Again:
            break
        while sock.getsockopt(zmq.RCVMORE):  # a multipart message is not a subscription
            sock.recv(flags=zmq.NOBLOCK)
            frame = b""
        if frame[:1] == b"\x01":
            topics.append(frame[1:])
    return topics


def sub_socket(ctx: zmq.Context, addresses: Iterable[str], topics: Iterable[bytes],
               hwm: int = 10000) -> zmq.Socket:
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.RCVHWM, hwm)
    sock.setsockopt(zmq.LINGER, 0)
    # Reconnect quickly when a publisher restarts: profiles resume within a window.
    sock.setsockopt(zmq.RECONNECT_IVL, 200)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
    for t in topics:
        sock.setsockopt(zmq.SUBSCRIBE, t)
    for a in addresses:
        sock.connect(a)
    return sock


class Heartbeat:
    """Publishes ``heartbeat.<service>`` with the service's metrics every HEARTBEAT_INTERVAL.

    Every service beats on the same wall-clock multiples of the interval. A wake-up costs a
    Python service 0.1-0.3 ms of CPU on a small VM whatever it then does, and a heartbeat used
    to cost one in its sender and one in the UI for each sender, at its own moment. Aligned,
    the collector beats in the wake-up of its drain (drains fall on wall-clock multiples of an
    interval that divides the window), the aggregator in the one the drained batch brings, the
    UI in the one the others' heartbeats bring, and the UI reads them all in one wake-up.

    ``due()`` is true from SLACK before the multiple; ``next_due`` (what a loop sleeps until) is
    ``lag`` after it: a service that is woken by other work soon after the multiple beats then,
    and only wakes for the heartbeat itself when nothing came by its ``lag``.
    """

    SLACK = 0.05

    def __init__(self, service: str, publisher: wire.Publisher, metrics: Metrics,
                 lag: float = SLACK):
        self.service = service
        self.publisher = publisher
        self.metrics = metrics
        self.lag = lag
        self.started = time.time()
        self._earliest = 0.0  # monotonic
        self._next = 0.0

    def due(self) -> bool:
        return time.monotonic() >= self._earliest

    def soon(self) -> None:
        """Make the next heartbeat due now: news worth not waiting an interval for (the first
        samples, say) reaches the UI and /metrics at once."""
        self._earliest = self._next = 0.0

    @property
    def next_due(self) -> float:
        """When the next heartbeat must go (monotonic seconds)."""
        return self._next

    def send(self, sock: zmq.Socket) -> None:
        wall, now = time.time(), time.monotonic()
        # The next multiple more than SLACK away: one sent early (within SLACK of the
        # multiple) or late (within lag) is next sent on the multiple after. The first (at
        # start, or after soon()) is followed by the next multiple, however near: at most an
        # interval apart, so a subscriber that missed the first waits no longer than before.
        boundary = (math.floor((wall + self.SLACK) / HEARTBEAT_INTERVAL) + 1) \
            * HEARTBEAT_INTERVAL
        self._earliest = now + (boundary - wall) - self.SLACK
        self._next = self._earliest + self.SLACK + self.lag
        body = {"service": self.service, "pid": os.getpid(), "started": self.started,
                "metrics": self.metrics.snapshot()}
        send_nowait(sock, self.publisher.encode("heartbeat", body), self.metrics,
                    socket_name=self.service)


def send_nowait(sock: zmq.Socket, frames: list[bytes], metrics: Metrics, socket_name: str) -> bool:
    """Send without blocking; count the message as dropped when the socket is full."""
    try:
        # Zero-copy hands each frame to pyzmq's garbage-collection thread, a wake-up that
        # costs more than copying anything smaller than about half a megabyte (measured).
        copy = sum(len(f) for f in frames) < ZERO_COPY_BYTES
        sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=copy)
        return True
    except zmq.Again:
        metrics.inc("messages_dropped_total", socket=socket_name)
        return False


def receive(sock: zmq.Socket, metrics: Metrics, gaps: wire.GapCounter,
            bad_log: RateLimitedLog) -> wire.Message | None:
    """Read one message without blocking; malformed ones are counted, logged at a rate, dropped."""
    try:
        frames = sock.recv_multipart(flags=zmq.NOBLOCK)
    except zmq.Again:
        return None
    try:
        msg = wire.decode(frames)
    except wire.WireError as e:
        metrics.inc("messages_malformed_total", reason=e.reason)
        bad_log.warning(e.reason, f"dropped a malformed message: {e}")
        return None
    lost = gaps.observe(msg)
    if lost:
        metrics.inc("messages_lost_total", lost, source=msg.src)
    metrics.inc("messages_received_total", type=msg.type)
    return msg
