"""Hypothesis-generated frames on every socket a service reads: the service survives, counts
them, and still does its job afterwards. Each service runs as a real subprocess; the test binds
the PUB sockets it connects to at the real endpoint paths."""

from __future__ import annotations

import json
import os
import time
import types
import urllib.request

import msgpack
import pytest
import zmq
from hypothesis import HealthCheck, given, settings, strategies as st

from services import runtime, wire
from tests.helpers.services import (Subscriber, free_port, service_env, start_service, stop,
                                    wait_until)

VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats() | st.text(max_size=12)
    | st.binary(max_size=12),
    lambda c: st.lists(c, max_size=5) | st.dictionaries(st.text(max_size=8), c, max_size=5),
    max_leaves=20)


def _header(mtype: str) -> bytes:
    return msgpack.packb({"v": list(wire.WIRE_VERSION), "type": mtype, "src": "fuzz", "seq": 1,
                          "ts": time.time()})


def body_for(mtype: str):
    """Bodies with every required key present but any values: past the wire check, into the
    service's own handling."""
    keys = wire.MESSAGE_FIELDS[mtype]
    return st.fixed_dictionaries({k: VALUES for k in keys})


def samples_like():
    record = st.lists(st.integers(-2**63, 2**64 - 1), min_size=0, max_size=7)
    return st.fixed_dictionaries({
        "time_ns": st.integers(-2**63, 2**64 - 1) | st.just(time.time_ns()),
        "duration_ns": st.integers(0, 10**10), "frequency": st.integers(-5, 10**6),
        "records": st.lists(record, max_size=6),
        "stacks": st.lists(st.lists(st.integers(-2**63, 2**64 - 1), max_size=4), max_size=4),
        "kernel_symbols": st.dictionaries(st.integers(-2**63, 2**64 - 1), VALUES, max_size=3)})


def process_like():
    mapping = st.fixed_dictionaries({k: VALUES | st.integers(0, 2**64 - 1) for k in
                                     ("start", "limit", "offset", "path", "build_id",
                                      "cache_path")})
    return st.fixed_dictionaries({
        "pid": st.integers(-2**40, 2**40), "start_time": VALUES, "comm": VALUES,
        "executable": VALUES, "cmdline": VALUES, "mappings": st.lists(mapping, max_size=3)})


def frames_strategy(topics: list[bytes]):
    garbage = st.lists(st.binary(max_size=40), min_size=1, max_size=5)
    typed = st.sampled_from(sorted(wire.MESSAGE_FIELDS)).flatmap(
        lambda t: body_for(t).map(lambda b: [t.encode(), _header(t), msgpack.packb(b)]))
    shaped = st.one_of(
        samples_like().map(lambda b: [b"samples", _header("samples"), msgpack.packb(b)]),
        process_like().map(lambda b: [b"process", _header("process"), msgpack.packb(b)]),
        st.fixed_dictionaries({"targets": st.lists(st.fixed_dictionaries(
            {"labels": VALUES, "cgroup_ids": VALUES, "pids": VALUES}), max_size=3),
            "filtering": VALUES}).map(
            lambda b: [b"targets", _header("targets"), msgpack.packb(b)]))
    # Garbage under each subscribed topic, so it passes the SUB filter.
    prefixed = st.tuples(st.sampled_from(topics), garbage).map(lambda tg: [tg[0]] + tg[1])
    return st.one_of(garbage, typed, shaped, prefixed)


class Publishers:
    def __init__(self, run_dir: str, endpoints: list[str]):
        self.ctx = zmq.Context()
        self.socks = {e: runtime.pub_socket(self.ctx, [wire.endpoint(run_dir, e)])
                      for e in endpoints}

    def send(self, frames: list[bytes]):
        for sock in self.socks.values():
            sock.send_multipart(frames)

    def close(self):
        self.ctx.destroy(linger=0)


def fuzz(pubs: Publishers, topics: list[bytes], proc, examples: int):
    sent = []

    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(frames_strategy(topics))
    def send_one(frames):
        pubs.send(frames)
        sent.append(1)
        assert proc.poll() is None, "the service died on a fuzzed message"

    send_one()
    time.sleep(1.0)
    assert proc.poll() is None, "the service died on a fuzzed message"
    return len(sent)


def heartbeat_metric(run_dir, endpoint, service, name):
    sub = Subscriber(run_dir, endpoint, [b"heartbeat." + service.encode()])
    try:
        msg = sub.wait_for(lambda m: True, 8)
    finally:
        sub.close()
    assert msg is not None, f"{service} sent no heartbeat"
    return sum(v for n, _labels, v in msg.body["metrics"] if n == name)


def test_aggregator_survives_fuzzed_stream_and_still_builds_profiles(tmp_path):
    run_dir = str(tmp_path)
    pubs = Publishers(run_dir, [wire.ENDPOINT_COLLECTOR, wire.ENDPOINT_DISCOVERY])
    proc = start_service("aggregator", service_env(run_dir, str(tmp_path / "cache"),
                                                   profiling_duration="1s"),
                         str(tmp_path / "aggregator.log"))
    try:
        assert wait_until(lambda: os.path.exists(os.path.join(run_dir, wire.ENDPOINT_AGGREGATOR)),
                          20)
        time.sleep(0.5)
        n = fuzz(pubs, [b"samples", b"process", b"targets"], proc, 400)
        assert n >= 300
        malformed = heartbeat_metric(run_dir, wire.ENDPOINT_AGGREGATOR, "aggregator",
                                     "parca_agent_aggregator_messages_malformed_total")
        assert malformed > 0
        # Then a real flow: a plain-host snapshot, a process and its samples.
        sub = Subscriber(run_dir, wire.ENDPOINT_AGGREGATOR, [wire.TOPIC_PROFILE])
        pub = wire.Publisher("collector")
        pubs.send(wire.Publisher("discovery").encode("targets", {"targets": [],
                                                                  "filtering": False}))
        pubs.send(pub.encode("process", {"pid": 4242, "start_time": 1, "comm": "survivor",
                                         "executable": "/bin/survivor", "cmdline": [],
                                         "mappings": []}))
        for _ in range(3):
            pubs.send(pub.encode("samples", {
                "time_ns": time.time_ns(), "duration_ns": 10**9, "frequency": 100,
                "records": [[4242, 4242, 1, 0, -1, 7]], "stacks": [[0x401000]],
                "kernel_symbols": {}}))
            time.sleep(0.3)
        # The aggregator sends a window's profiles as one `profiles` message.
        got = sub.wait_for(lambda m: m.type == "profiles" and any(
            p["labels"].get("comm") == "survivor" for p in m.body["profiles"]), 10)
        sub.close()
        assert got is not None, open(tmp_path / "aggregator.log").read()[-3000:]
        assert proc.poll() is None
    finally:
        assert stop(proc) == 0
        pubs.close()


def test_ui_survives_fuzzed_streams_and_still_serves(tmp_path):
    run_dir = str(tmp_path)
    endpoints = [wire.ENDPOINT_AGGREGATOR, wire.ENDPOINT_COLLECTOR, wire.ENDPOINT_DISCOVERY,
                 wire.ENDPOINT_SHIPPER_PUB]
    pubs = Publishers(run_dir, endpoints)
    port = free_port()
    proc = start_service("ui", service_env(run_dir, str(tmp_path / "cache"),
                                           http_address=f"127.0.0.1:{port}"),
                         str(tmp_path / "ui.log"))
    try:
        url = f"http://127.0.0.1:{port}"

        def healthy():
            try:
                return urllib.request.urlopen(url + "/healthz", timeout=2).status == 200
            except OSError:
                return False
        assert wait_until(healthy, 20)
        time.sleep(0.5)
        fuzz(pubs, [b"profile", b"heartbeat"], proc, 300)
        assert healthy()
        metrics = urllib.request.urlopen(url + "/metrics", timeout=5).read().decode()
        assert "parca_agent_ui_messages_malformed_total" in metrics
        from tests.helpers.ui_fakes import chain_pprof

        body = {"id": "after-fuzz", "labels": {"node": "n", "comm": "after"},
                "start_ns": time.time_ns() - 10**10, "end_ns": time.time_ns(),
                "pprof": chain_pprof(), "samples": 100}
        pubs.send(wire.Publisher("aggregator").encode("profile", body))

        def listed():
            data = json.load(urllib.request.urlopen(url + "/api/targets", timeout=5))
            return any(t["labels"].get("comm") == "after" for t in data["targets"])
        assert wait_until(listed, 10)
    finally:
        assert stop(proc) == 0
        pubs.close()


@pytest.mark.bpf
def test_collector_survives_fuzzed_targets_and_keeps_sampling(tmp_path, require_bpf):
    run_dir = str(tmp_path)
    pubs = Publishers(run_dir, [wire.ENDPOINT_DISCOVERY])
    proc = start_service("collector", service_env(run_dir, str(tmp_path / "cache")),
                         str(tmp_path / "collector.log"))
    try:
        assert wait_until(lambda: os.path.exists(os.path.join(run_dir, wire.ENDPOINT_COLLECTOR))
                          or proc.poll() is not None, 60)
        time.sleep(0.5)
        fuzz(pubs, [b"targets"], proc, 300)
        # Its own socket reads too (an XPUB: subscriptions), and an XSUB can send it any frame.
        xsub = pubs.ctx.socket(zmq.XSUB)
        xsub.connect(wire.endpoint(run_dir, wire.ENDPOINT_COLLECTOR))
        fuzz(types.SimpleNamespace(send=xsub.send_multipart), [b"\x01", b"\x00", b"\x01process"],
             proc, 200)
        xsub.close()
        # Filtering off again, then samples must flow.
        pubs.send(wire.Publisher("discovery").encode("targets", {"targets": [],
                                                                  "filtering": False}))
        sub = Subscriber(run_dir, wire.ENDPOINT_COLLECTOR, [wire.TOPIC_SAMPLES])
        busy = __import__("subprocess").Popen(["sh", "-c", "while :; do :; done"])
        try:
            got = sub.wait_for(lambda m: any(r[0] == busy.pid for r in m.body["records"]), 10)
        finally:
            busy.kill()
            busy.wait()
            sub.close()
        assert got is not None, open(tmp_path / "collector.log").read()[-3000:]
    finally:
        assert stop(proc) == 0
        pubs.close()


def test_discovery_survives_fuzzed_subscriptions_and_still_publishes(tmp_path):
    """Discovery reads its own socket (an XPUB: a join sends the snapshot); an XSUB can send
    it any frame, subscriptions to targets among them."""
    run_dir = str(tmp_path)
    proc = start_service("discovery", service_env(run_dir, str(tmp_path / "cache")),
                         str(tmp_path / "discovery.log"))
    ctx = zmq.Context()
    try:
        assert wait_until(lambda: os.path.exists(os.path.join(run_dir, wire.ENDPOINT_DISCOVERY))
                          or proc.poll() is not None, 30)
        xsub = ctx.socket(zmq.XSUB)
        xsub.setsockopt(zmq.LINGER, 0)
        xsub.connect(wire.endpoint(run_dir, wire.ENDPOINT_DISCOVERY))
        time.sleep(0.3)
        fuzz(types.SimpleNamespace(send=xsub.send_multipart),
             [b"\x01", b"\x00", b"\x01targets", b"\x01t"], proc, 300)
        xsub.close()
        sub = Subscriber(run_dir, wire.ENDPOINT_DISCOVERY, [wire.TOPIC_TARGETS])
        try:
            got = sub.wait_for(lambda m: m.type == "targets", 5)
        finally:
            sub.close()
        assert got is not None and got.body == {"targets": [], "filtering": False}, \
            open(tmp_path / "discovery.log").read()[-3000:]
    finally:
        assert stop(proc) == 0
        ctx.destroy(linger=0)
