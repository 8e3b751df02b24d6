"""runtime.Wakeup: an event a ZeroMQ poller sleeps on, set from another thread."""

from __future__ import annotations

import threading
import time

import zmq

from services import runtime


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
