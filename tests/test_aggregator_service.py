"""The aggregator as a subprocess against a stand-in collector: an XPUB bound at the collector's
endpoint, as the real collector's is (the test reads the subscriptions the aggregator sends)."""

from __future__ import annotations

import os
import time

import zmq

from services import runtime, wire
from tests.helpers.services import Subscriber, service_env, start_service, stop, wait_until


def _process(pid: int) -> dict:
    return {"pid": pid, "start_time": 1, "comm": f"p{pid}", "executable": "/bin/p",
            "cmdline": [], "mappings": []}


def _subscriptions(xpub: zmq.Socket, seconds: float) -> list[bytes]:
    """The topics subscribed to within ``seconds`` (all of them, not the first only)."""
    topics: list[bytes] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if xpub.poll(100):
            topics += runtime.new_subscriptions(xpub)
    return topics


def test_a_gap_in_process_messages_makes_the_aggregator_subscribe_again(tmp_path):
    """A lost process message (a gap in the topic's sequence) makes the aggregator subscribe to
    `process` again, which the collector answers with every process; at most every
    CATCH_UP_EVERY seconds, and never without a gap."""
    run_dir = str(tmp_path)
    ctx = zmq.Context()
    xpub = runtime.pub_socket(ctx, [wire.endpoint(run_dir, wire.ENDPOINT_COLLECTOR)],
                              subscriptions=True)
    proc = start_service("aggregator", service_env(run_dir, str(tmp_path / "cache"),
                                                   profiling_duration="1s"),
                         str(tmp_path / "aggregator.log"))
    try:
        assert wait_until(lambda: os.path.exists(wire.endpoint(run_dir, wire.ENDPOINT_AGGREGATOR)
                                                 .removeprefix("ipc://")), 20)
        first = _subscriptions(xpub, 3)
        assert wire.TOPIC_PROCESS in first and wire.TOPIC_SAMPLES in first, first
        pub = wire.Publisher("collector")
        xpub.send_multipart(pub.encode("process", _process(1)))  # seq 1
        xpub.send_multipart(pub.encode("process", _process(2)))  # seq 2: no gap
        assert _subscriptions(xpub, 1.5) == [], "subscribed again without a gap"
        pub.seq[wire.TOPIC_PROCESS] += 1  # seq 3 is lost on the way
        xpub.send_multipart(pub.encode("process", _process(4)))
        assert _subscriptions(xpub, 5) == [wire.TOPIC_PROCESS]
        pub.seq[wire.TOPIC_PROCESS] += 1  # another loss at once: the catch-up asked covers it
        xpub.send_multipart(pub.encode("process", _process(6)))
        assert _subscriptions(xpub, 1.5) == []
        sub = Subscriber(run_dir, wire.ENDPOINT_AGGREGATOR, [b"heartbeat.aggregator"])
        beat = sub.wait_for(lambda m: True, 8)
        sub.close()
        assert beat is not None
        counted = {n: v for n, _labels, v in beat.body["metrics"]}
        assert counted["parca_agent_aggregator_process_catch_ups_total"] == 1
        assert proc.poll() is None
    finally:
        assert stop(proc) == 0
        ctx.destroy(linger=0)
