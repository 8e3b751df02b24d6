"""runtime: Wakeup (an event a ZeroMQ poller sleeps on, set from another thread) and the
heartbeat's timing (every service on the same wall-clock multiples)."""

from __future__ import annotations

import threading
import time

import zmq

from services import runtime, wire


def readable(wakeup: runtime.Wakeup, timeout_ms: int = 0) -> bool:
    poller = zmq.Poller()
    poller.register(wakeup.fileno(), zmq.POLLIN)
    return bool(poller.poll(timeout_ms))


def test_readable_exactly_while_set_however_often_it_was_set():
    wakeup = runtime.Wakeup()
    assert not wakeup.is_set() and not readable(wakeup)
    for _ in range(3):
        wakeup.set()
    assert wakeup.is_set() and readable(wakeup)
    wakeup.clear()
    # One clear after three sets: were each set a byte in the pipe, it would still be readable
    # and the loop sleeping on it would spin.
    assert not wakeup.is_set() and not readable(wakeup)
    wakeup.clear()  # clearing a cleared one is harmless
    assert not readable(wakeup)
    wakeup.set()
    assert readable(wakeup) and wakeup.wait(0)


def test_a_set_from_another_thread_wakes_a_sleeping_poller():
    wakeup = runtime.Wakeup()
    setter = threading.Timer(0.2, wakeup.set)
    started = time.monotonic()
    setter.start()
    assert readable(wakeup, timeout_ms=5000)
    assert 0.15 < time.monotonic() - started < 4.0
    setter.join()


def test_set_and_clear_racing_leave_the_pipe_and_the_event_agreeing():
    wakeup = runtime.Wakeup()
    stop = threading.Event()

    def setter():
        while not stop.is_set():
            wakeup.set()

    thread = threading.Thread(target=setter)
    thread.start()
    try:
        for _ in range(2000):
            wakeup.clear()
    finally:
        stop.set()
        thread.join(5)
    wakeup.clear()
    assert not wakeup.is_set() and not readable(wakeup)
    wakeup.set()
    assert readable(wakeup)


class Sent:
    """A socket stand-in that keeps what Heartbeat.send hands it (the wire encoding is
    tested in test_wire; here only the timing)."""

    def __init__(self):
        self.frames = []

    def send_multipart(self, frames, flags=0, copy=True):
        self.frames.append(frames)


def test_heartbeats_fall_on_the_same_wall_clock_multiples_for_every_service():
    interval = runtime.HEARTBEAT_INTERVAL
    beats = [runtime.Heartbeat(name, wire.Publisher(name), runtime.Metrics(name), lag=lag)
             for name, lag in (("collector", runtime.Heartbeat.SLACK), ("aggregator", 0.5),
                               ("ui", 0.5))]
    for beat in beats:
        assert beat.due()  # the first goes at once
        beat.send(Sent())
        assert not beat.due()
    wall, now = time.time(), time.monotonic()
    boundary = (int((wall + runtime.Heartbeat.SLACK) / interval) + 1) * interval
    for beat in beats:
        earliest = beat.next_due - beat.lag - runtime.Heartbeat.SLACK
        # Earliest is SLACK before the next multiple (more than SLACK away, at most an
        # interval); the deadline is lag after it.
        assert abs((earliest - now) - (boundary - wall - runtime.Heartbeat.SLACK)) < 0.01
        assert runtime.Heartbeat.SLACK - 0.01 <= boundary - wall <= interval + 0.06
    firsts = {round(beat.next_due - beat.lag, 2) for beat in beats}
    assert len(firsts) == 1  # the same multiple for all, whatever their lag


def test_heartbeat_due_from_slack_before_until_sent_and_soon_makes_it_due():
    beat = runtime.Heartbeat("shipper", wire.Publisher("shipper"), runtime.Metrics("shipper"),
                             lag=0.3)
    sock = Sent()
    beat.send(sock)
    assert len(sock.frames) == 1
    multiple = beat.next_due - beat.lag
    assert not beat.due()
    beat._earliest -= multiple - time.monotonic()  # as if the multiple were SLACK away
    assert beat.due()
    beat.soon()
    assert beat.due() and beat.next_due == 0.0
    beat.send(sock)
    assert len(sock.frames) == 2 and not beat.due()
