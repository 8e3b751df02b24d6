"""The aggregator -> shipper channel: resends until acknowledged, a bounded memory queue, no
duplicate spooling, and no frames that can stop the shipper's loop."""

from __future__ import annotations

import os
import time

import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from services import runtime, wire
from services import profile_channel
from services.profile_channel import ProfileInbox, ProfileSender, batches
from tests.helpers.store_server import ShipperThread, profile_body, send_acked, wait_until

ENV = {"PARCA_AGENT_INSECURE": "true"}


def test_sender_resends_until_acknowledged(tmp_path):
    metrics = runtime.Metrics("parca_agent_shipper")
    inbox = ProfileInbox(str(tmp_path), metrics)
    sender = ProfileSender(str(tmp_path), resend_after=0.2)
    try:
        sender.send(profile_body(1))
        seen = []
        # The "shipper" ignores the first two deliveries, as if its acks had been lost.
        assert wait_until(lambda: sender.poll() >= 0 and _collect(inbox, seen) >= 3, 10)
        assert {r.message.body["id"] for r in seen} == {"profile-1"}
        assert sender.pending() == 1
        inbox.ack(seen[-1].peer, "profile-1")
        assert wait_until(lambda: sender.poll() >= 0 and sender.pending() == 0, 5)
        time.sleep(0.1)  # a resend already on its way may still arrive
        after = _collect(inbox, seen)
        for _ in range(6):  # three resend intervals: nothing more once acknowledged
            time.sleep(0.1)
            sender.poll()
        assert _collect(inbox, seen) == after
    finally:
        sender.close()
        inbox.close()


def _collect(inbox: ProfileInbox, seen: list) -> int:
    while (delivery := inbox.receive()) is not None:
        seen.extend(delivery.profiles)
    return len(seen)


def test_sender_waits_for_a_shipper_that_starts_later(tmp_path):
    sender = ProfileSender(str(tmp_path), resend_after=0.2)
    try:
        sender.send(profile_body(1))
        sender.poll()
        assert sender.pending() == 1
        inbox = ProfileInbox(str(tmp_path), runtime.Metrics("test"))
        try:
            seen: list = []
            assert wait_until(lambda: sender.poll() >= 0 and _collect(inbox, seen) >= 1, 10)
            inbox.ack(seen[0].peer, "profile-1")
            assert wait_until(lambda: sender.poll() >= 0 and sender.pending() == 0, 5)
        finally:
            inbox.close()
    finally:
        sender.close()


def test_memory_queue_is_bounded_and_drops_the_oldest(tmp_path):
    one = sum(len(f) for f in wire.Publisher("a").encode("profile", profile_body(0)))
    sender = ProfileSender(str(tmp_path), max_bytes=3 * one + one // 2, resend_after=0.1)
    try:
        for n in range(7):
            sender.send(profile_body(n))
        assert sender.pending() == 3
        assert sender.dropped == 4
        assert sender.metrics.get("profiles_dropped_total", reason="queue_full") == 4
        assert sender.pending_bytes() <= sender.max_bytes
        inbox = ProfileInbox(str(tmp_path), runtime.Metrics("test"))
        try:
            seen: list = []
            wait_until(lambda: sender.poll() >= 0 and _collect(inbox, seen) >= 3, 10)
            assert {r.message.body["id"] for r in seen} == {"profile-4", "profile-5", "profile-6"}
        finally:
            inbox.close()
    finally:
        sender.close()


def test_a_resent_profile_is_acked_again_not_spooled_twice(tmp_path):
    # The store is unreachable, so every profile stays in the spool where it can be counted.
    with ShipperThread(tmp_path, "127.0.0.1:1", env=ENV) as sh:
        first, second = sh.sender(), sh.sender()
        send_acked(first, [profile_body(1), profile_body(2)])
        send_acked(second, [profile_body(1)])  # a resend whose first ack was lost
        assert sh.metric("profiles_spooled_total") == 2
        assert sh.metric("profiles_duplicate_total") == 1
        assert len(os.listdir(tmp_path / "cache" / "spool")) == 2


_ANY = st.one_of(st.none(), st.booleans(), st.integers(-(2 ** 63), 2 ** 64 - 1), st.text(max_size=8),
                 st.binary(max_size=16), st.lists(st.integers(0, 9), max_size=3),
                 st.dictionaries(st.text(max_size=4), st.one_of(st.text(max_size=4),
                                                                st.integers(0, 9)), max_size=3))
_PROFILE_LIKE = st.fixed_dictionaries(
    {k: _ANY for k in wire.MESSAGE_FIELDS["profile"]}).map(
    lambda body: wire.Publisher("fuzz").encode("profile", body))
_BATCH_LIKE = st.fixed_dictionaries(
    {"id": _ANY, "profiles": st.one_of(_ANY, st.lists(st.one_of(_ANY, st.fixed_dictionaries(
        {k: _ANY for k in wire.MESSAGE_FIELDS["profile"]})), max_size=3))}).map(
    lambda body: wire.Publisher("fuzz").encode("profiles", body))
_GARBAGE = st.lists(st.binary(max_size=64), min_size=1, max_size=5)
_WRONG_TYPE = st.sampled_from(["ack", "heartbeat", "samples"]).map(
    lambda t: wire.Publisher("fuzz").encode(t, {k: 1 for k in wire.MESSAGE_FIELDS[t]}))


def test_garbage_frames_never_stop_the_shipper_loop(tmp_path):
    with ShipperThread(tmp_path, "127.0.0.1:1", env=ENV) as sh:
        ctx = zmq.Context.instance()
        fuzzer = ctx.socket(zmq.DEALER)
        fuzzer.setsockopt(zmq.LINGER, 0)
        fuzzer.connect(wire.endpoint(sh.settings.run_dir, wire.ENDPOINT_SHIPPER))

        @settings(max_examples=300, deadline=None, database=None)
        @given(frames=st.one_of(_GARBAGE, _PROFILE_LIKE, _BATCH_LIKE, _WRONG_TYPE))
        def feed(frames):
            fuzzer.send_multipart(frames)

        try:
            feed()
            # Still alive and still serving: a good profile is spooled and acknowledged.
            send_acked(sh.sender(), [profile_body(99)], timeout=10)
            assert sh.thread.is_alive()
            assert sh.metric("messages_malformed_total", reason="bad_profile") > 0
        finally:
            fuzzer.close()


def test_batches_keep_order_within_their_bounds():
    bodies = [dict(profile_body(n), pprof=b"x" * size) for n, size in
              enumerate([10, 10, 10, 25, 5, 40, 1])]
    got = [[b["id"] for b in batch] for batch in batches(bodies, max_profiles=3, max_bytes=30)]
    # 3 profiles at most; 30 bytes at most, unless one alone is larger.
    assert got == [["profile-0", "profile-1", "profile-2"], ["profile-3", "profile-4"],
                   ["profile-5"], ["profile-6"]]
    assert list(batches([])) == []


def test_a_batch_is_spooled_per_profile_and_acknowledged_as_one(tmp_path, monkeypatch):
    """send_many: as many messages as the bounds need, each acknowledged once all of its
    profiles are in the spool; a resent batch spools only the profiles the spool lacks."""
    monkeypatch.setattr(profile_channel, "BATCH_MAX_PROFILES", 2)
    with ShipperThread(tmp_path, "127.0.0.1:1", env=ENV) as sh:
        sender = sh.sender()
        sent = sender.send_many([profile_body(n) for n in range(5)])
        assert len(sent) == 3 and sender.pending() == 5
        assert [f[0] for f in sent] == [b"profiles"] * 3
        assert wait_until(lambda: sender.poll() >= 0 and sender.pending() == 0, 10)
        assert sh.metric("messages_received_total", type="profiles") == 3
        assert sh.metric("profiles_spooled_total") == 5
        # A later batch holding a profile the spool has (as after a lost ack) and a new one. The
        # same batch resent under its own id: test_an_unacknowledged_batch_is_resent_whole_...
        sender.send_many([profile_body(4), profile_body(5)])
        assert wait_until(lambda: sender.poll() >= 0 and sender.pending() == 0, 10)
        assert sh.metric("profiles_spooled_total") == 6
        assert sh.metric("profiles_duplicate_total") == 1
        assert len(os.listdir(tmp_path / "cache" / "spool")) == 6


def test_a_bad_profile_in_a_batch_is_left_out_and_the_rest_spooled(tmp_path):
    with ShipperThread(tmp_path, "127.0.0.1:1", env=ENV) as sh:
        sender = sh.sender()
        bad = dict(profile_body(2), labels={"pod": 7})  # a label value that is not a string
        sender.send_many([profile_body(1), bad, profile_body(3)])
        assert wait_until(lambda: sender.poll() >= 0 and sender.pending() == 0, 10)
        assert sh.metric("profiles_spooled_total") == 2
        assert sh.metric("messages_malformed_total", reason="bad_profile") == 1
        assert len(os.listdir(tmp_path / "cache" / "spool")) == 2


def test_the_memory_bound_drops_whole_batches_and_counts_their_profiles(tmp_path):
    one = sum(len(f) for f in wire.Publisher("a").encode(
        "profiles", {"id": "x" * 32, "profiles": [profile_body(0), profile_body(1)]}))
    sender = ProfileSender(str(tmp_path), max_bytes=2 * one + one // 2, resend_after=0.1)
    try:
        for n in range(0, 8, 2):
            sender.send_many([profile_body(n), profile_body(n + 1)])
        assert sender.pending() == 4 and sender.dropped == 4
        assert sender.metrics.get("profiles_dropped_total", reason="queue_full") == 4
        inbox = ProfileInbox(str(tmp_path), runtime.Metrics("test"))
        try:
            seen: list = []
            wait_until(lambda: sender.poll() >= 0 and _collect(inbox, seen) >= 4, 10)
            assert {r.message.body["id"] for r in seen} == {f"profile-{n}" for n in (4, 5, 6, 7)}
        finally:
            inbox.close()
    finally:
        sender.close()


def test_an_unacknowledged_batch_is_resent_whole_under_its_id(tmp_path):
    metrics = runtime.Metrics("parca_agent_shipper")
    inbox = ProfileInbox(str(tmp_path), metrics)
    sender = ProfileSender(str(tmp_path), resend_after=0.2)
    try:
        sender.send_many([profile_body(1), profile_body(2)])
        deliveries = []

        def take() -> int:
            sender.poll()
            while (d := inbox.receive()) is not None:
                deliveries.append(d)
            return len(deliveries)
        assert wait_until(lambda: take() >= 2, 10)  # the first delivery and a resend
        assert len({d.ack_id for d in deliveries}) == 1
        assert all([r.message.body["id"] for r in d.profiles] == ["profile-1", "profile-2"]
                   for d in deliveries)
        assert sender.metrics.get("profiles_resent_total") >= 2  # counted in profiles
        inbox.ack(deliveries[0].peer, deliveries[0].ack_id)
        assert wait_until(lambda: sender.poll() >= 0 and sender.pending() == 0, 5)
    finally:
        sender.close()
        inbox.close()


def test_a_batch_profile_is_encoded_as_its_own_message_only_when_asked_for(tmp_path):
    """A profile of a batch becomes its own ``profile`` message (the spool's unit) when the
    shipper asks for its frames, not on receipt: without a store it never asks."""
    inbox = ProfileInbox(str(tmp_path), runtime.Metrics("test"))
    # The sender's socket drops what it sends before its connection is up (IMMEDIATE) and
    # resends after resend_after: poll it while waiting.
    sender = ProfileSender(str(tmp_path), resend_after=0.2, metrics=runtime.Metrics("test"))
    try:
        sender.send_many([profile_body(1), profile_body(2)])
        delivery = None
        deadline = time.monotonic() + 10
        while delivery is None and time.monotonic() < deadline:
            sender.poll()
            delivery = inbox.receive()
            time.sleep(0.01)
        assert delivery is not None and len(delivery.profiles) == 2
        assert all(p._frames is None for p in delivery.profiles)
        for n, received in zip((1, 2), delivery.profiles):
            msg = wire.decode(received.frames)
            assert msg.type == "profile" and msg.body == profile_body(n)
            assert received.frames is received.frames  # encoded once
    finally:
        sender.close()
        inbox.close()
