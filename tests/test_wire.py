"""The wire module: round trips, garbage that must never crash a receiver, and docs/wire.md."""

from __future__ import annotations

import re
from pathlib import Path

import msgpack
import pytest
import zmq
from hypothesis import HealthCheck, given, settings, strategies as st

from services import runtime, wire

EXAMPLES = {
    "samples": {"time_ns": 1, "duration_ns": 2, "frequency": 100,
                "records": [[10, 11, 1, 0, -1, 5]], "stacks": [[0x401000, 0x401100]],
                "kernel_symbols": {0xffffffff81000000: "do_syscall_64"}, "errors": {}},
    "process": {"pid": 10, "start_time": 123, "comm": "<img src=x>", "executable": "/bin/x",
                "cmdline": ["x"], "mappings": [{"start": 1, "limit": 2, "offset": 0,
                                                "path": "/bin/x", "build_id": "ab",
                                                "cache_path": ""}]},
    "targets": {"targets": [{"labels": {"node": "n"}, "cgroup_ids": [1], "pids": [2]}],
                "filtering": True},
    "profile": {"id": "abc", "labels": {"pod": "p"}, "start_ns": 1, "end_ns": 2,
                "pprof": b"\x1f\x8b binary", "samples": 3},
    "profiles": {"id": "batch", "profiles": [{"id": "abc", "labels": {"pod": "p"},
                                              "start_ns": 1, "end_ns": 2,
                                              "pprof": b"\x1f\x8b binary", "samples": 3}]},
    "ack": {"id": "abc"},
    "heartbeat": {"service": "collector", "pid": 1, "started": 1.5,
                  "metrics": [["parca_agent_collector_samples_total", {}, 3.0]]},
}


def _tuples(value):
    if isinstance(value, list):
        return tuple(map(_tuples, value))
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    return value


def test_examples_cover_every_message_type():
    assert set(EXAMPLES) == set(wire.MESSAGE_FIELDS)


@pytest.mark.parametrize("mtype", sorted(wire.MESSAGE_FIELDS))
def test_round_trip(mtype):
    pub = wire.Publisher("test")
    frames = pub.encode(mtype, EXAMPLES[mtype])
    msg = wire.decode(frames)
    assert msg.type == mtype and msg.src == "test" and msg.seq == 1
    expected = EXAMPLES[mtype]
    if mtype in wire.TUPLE_BODIES:  # arrays come back as tuples, nested ones too
        expected = {k: _tuples(v) for k, v in expected.items()}
        assert type(msg.body["stacks"][0]) is tuple
    assert msg.body == expected
    assert msg.version == wire.WIRE_VERSION
    assert msg.topic == (b"heartbeat.test" if mtype == "heartbeat" else mtype.encode())
    assert wire.decode(pub.encode(mtype, EXAMPLES[mtype])).seq == 2


def test_encode_refuses_a_body_without_its_keys():
    with pytest.raises(ValueError):
        wire.Publisher("t").encode("ack", {})


def test_unknown_major_version_is_refused_but_a_newer_minor_is_read():
    frames = wire.Publisher("t").encode("ack", {"id": "x"})
    header = msgpack.unpackb(frames[1])
    header["v"] = [wire.WIRE_VERSION[0] + 1, 0]
    with pytest.raises(wire.WireError) as e:
        wire.decode([frames[0], msgpack.packb(header), frames[2]])
    assert e.value.reason == "unknown_version"
    header["v"] = [wire.WIRE_VERSION[0], wire.WIRE_VERSION[1] + 7]
    body = {"id": "x", "added_in_a_later_minor": 1}
    assert wire.decode([frames[0], msgpack.packb(header), msgpack.packb(body)]).body["id"] == "x"


def test_gap_counter_counts_lost_messages_and_survives_restarts():
    gaps = wire.GapCounter()
    for seq in (1, 2, 5, 6, 1, 3):
        gaps.observe(wire.Message("ack", {}, src="a", seq=seq, topic=b"ack"))
    assert gaps.lost == 2 + 1  # 3,4 missing; after the restart (1) 2 is missing


def test_sequence_counts_per_topic_so_filtered_subscribers_see_no_false_gaps():
    pub = wire.Publisher("collector")
    gaps = wire.GapCounter()
    for i in range(5):
        pub.encode("heartbeat", EXAMPLES["heartbeat"])  # not subscribed to
        gaps.observe(wire.decode(pub.encode("samples", EXAMPLES["samples"])))
    assert gaps.lost == 0


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=64), min_size=0, max_size=5))
def test_garbage_frames_raise_only_wire_error(frames):
    try:
        wire.decode(frames)
    except wire.WireError:
        pass


def _valid_header(mtype="ack"):
    return msgpack.packb({"v": list(wire.WIRE_VERSION), "type": mtype, "src": "x", "seq": 1,
                          "ts": 0.0})


@settings(max_examples=200, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers(-2**63, 2**63 - 1) | st.text(max_size=8)
                    | st.binary(max_size=8),
                    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=4), c,
                                                                          max_size=4),
                    max_leaves=10))
def test_well_framed_but_wrong_bodies_raise_only_wire_error(body):
    for mtype in wire.MESSAGE_FIELDS:
        try:
            wire.decode([b"t", _valid_header(mtype), msgpack.packb(body)])
        except wire.WireError:
            pass


def test_receive_loop_counts_garbage_on_a_real_socket(tmp_path):
    """Garbage sent over a real ipc socket is counted and the loop reads on to a good message."""
    ctx = zmq.Context()
    address = wire.endpoint(str(tmp_path), "t.sock")
    pub = runtime.pub_socket(ctx, [address])
    sub = runtime.sub_socket(ctx, [address], [b""])
    metrics = runtime.Metrics("t")
    gaps, log = wire.GapCounter(), runtime.RateLimitedLog(__import__("logging").getLogger("t"))
    import time

    time.sleep(0.3)  # PUB/SUB: let the subscription reach the publisher
    garbage = [[b"x"], [b"a", b"\xc1", b"b"], [b"ack", _valid_header(), b"\x93\x01"],
               [b"ack", msgpack.packb({"v": [99, 0], "type": "ack"}), msgpack.packb({"id": 1})]]
    for frames in garbage:
        pub.send_multipart(frames)
    pub.send_multipart(wire.Publisher("good").encode("ack", {"id": "ok"}))
    got, deadline = None, time.monotonic() + 5
    while got is None and time.monotonic() < deadline:
        sub.poll(100)
        got = runtime.receive(sub, metrics, gaps, log) or got
        while (m := runtime.receive(sub, metrics, gaps, log)) is not None:
            got = m
    assert got is not None and got.body == {"id": "ok"}
    malformed = sum(v for name, labels, v in metrics.snapshot()
                    if name == "t_messages_malformed_total")
    assert malformed == len(garbage)
    ctx.destroy(linger=0)


def test_a_subscriptions_socket_reports_each_join_and_drops_anything_else(tmp_path):
    """Real ipc sockets: two subscribers to one topic are both reported (XPUB_VERBOSE), an
    unsubscribe is not, and frames an XSUB sends that are no subscription are read and
    dropped without stopping the ones after them; the socket still publishes."""
    import time

    ctx = zmq.Context()
    address = wire.endpoint(str(tmp_path), "x.sock")
    pub = runtime.pub_socket(ctx, [address], subscriptions=True)
    joined: list[bytes] = []

    def read(expect: int) -> None:
        deadline = time.monotonic() + 5
        while len(joined) < expect and time.monotonic() < deadline:
            if pub.poll(100):
                joined.extend(runtime.new_subscriptions(pub))

    first = runtime.sub_socket(ctx, [address], [b"process"])
    read(1)
    xsub = ctx.socket(zmq.XSUB)
    xsub.connect(address)
    time.sleep(0.2)
    xsub.send_multipart([b"junk", b"\x01process"])  # a subscription only as a first frame
    xsub.send(b"garbage")
    xsub.send(b"\x00process")  # an unsubscribe
    xsub.send(b"")
    second = runtime.sub_socket(ctx, [address], [b"process"])
    read(2)
    assert joined == [b"process", b"process"]
    pub.send_multipart([b"process", b"hello"])
    assert second.poll(2000) and second.recv_multipart() == [b"process", b"hello"]
    first.close()
    ctx.destroy(linger=0)


def test_docs_wire_md_matches_the_module():
    doc = (Path(__file__).resolve().parent.parent / "docs" / "wire.md").read_text()
    m = re.search(r"Wire version: \*\*(\d+)\.(\d+)\*\*", doc)
    assert m and (int(m.group(1)), int(m.group(2))) == wire.WIRE_VERSION
    for mtype, keys in wire.MESSAGE_FIELDS.items():
        section = re.search(rf"### `{mtype}`(.*?)(?=\n### |\Z)", doc, re.S)
        assert section, f"docs/wire.md has no section for {mtype}"
        for key in keys:
            assert f"`{key}`" in section.group(1), f"docs/wire.md: {mtype} does not document {key}"
    for name in wire.ALL_ENDPOINTS:
        assert f"`{name}`" in doc
