"""The on-disk spool: bounded (oldest dropped and counted), survives restarts, skips corrupt
files, and a full disk is a counted error, not a crash."""

from __future__ import annotations

import errno
import logging
import os
from collections import Counter

import pytest

from services import runtime, wire
from services.shipper import spool as spool_module
from services.shipper.spool import Spool, SpoolError, pack_frames, unpack_frames
from tests.helpers.store_server import FakeStore, ShipperThread, profile_body, wait_until


def frames_of(body: dict) -> list[bytes]:
    return wire.Publisher("aggregator").encode("profile", body)


def new_spool(path, max_bytes: int = 10 * 1024 * 1024) -> tuple[Spool, runtime.Metrics]:
    metrics = runtime.Metrics("parca_agent_shipper")
    return Spool(str(path), max_bytes, metrics), metrics


def test_full_spool_drops_the_oldest_and_counts(tmp_path):
    bodies = [profile_body(n) for n in range(6)]
    size = len(pack_frames(frames_of(bodies[0])))
    spool, metrics = new_spool(tmp_path, max_bytes=3 * size + size // 2)
    for body in bodies:
        assert spool.add(body["id"], frames_of(body)) == "spooled"
    kept = [spool.load(e).body["id"] for e in spool.oldest(100, 1 << 30)]
    assert kept == ["profile-3", "profile-4", "profile-5"]
    assert metrics.get("spool_dropped_total", reason="full") == 3
    assert metrics.get("spool_files") == 3
    assert spool.bytes <= spool.max_bytes
    assert sum(os.path.getsize(tmp_path / n) for n in os.listdir(tmp_path)) == spool.bytes


def test_spool_survives_a_restart_in_order_and_still_deduplicates(tmp_path):
    spool, _ = new_spool(tmp_path)
    for n in range(3):
        spool.add(f"profile-{n}", frames_of(profile_body(n)))
    (tmp_path / "00000000000000000001-torn.profile.tmp").write_bytes(b"half a wri")
    reopened, metrics = new_spool(tmp_path)
    assert [reopened.load(e).body["id"] for e in reopened.oldest(100, 1 << 30)] == [
        "profile-0", "profile-1", "profile-2"]
    assert reopened.add("profile-1", frames_of(profile_body(1))) == "duplicate"
    assert metrics.get("spool_files") == 3
    assert not any(n.endswith(".tmp") for n in os.listdir(tmp_path))


def test_a_full_disk_is_a_counted_error_and_leaves_nothing_behind(tmp_path, monkeypatch):
    spool, metrics = new_spool(tmp_path)

    def disk_full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(spool_module.os, "write", disk_full)
    with pytest.raises(SpoolError, match="No space left"):
        spool.add("profile-1", frames_of(profile_body(1)))
    monkeypatch.undo()
    assert metrics.get("spool_errors_total", reason="ENOSPC") == 1
    assert os.listdir(tmp_path) == []
    # Not remembered: the aggregator's resend must be spooled once the disk has room.
    assert spool.add("profile-1", frames_of(profile_body(1))) == "spooled"


def test_damaged_envelopes_are_refused():
    data = pack_frames([b"profile", b"header", b"body"])
    assert unpack_frames(data) == [b"profile", b"header", b"body"]
    for damaged in (data[:-1], data[:20], b"x" + data[1:], data[:12] + b"\xff" + data[13:]):
        with pytest.raises(ValueError):
            unpack_frames(damaged)


def test_corrupt_spool_file_is_skipped_and_the_rest_delivered(tmp_path, caplog):
    spool_dir = tmp_path / "cache" / "spool"
    spool, _ = new_spool(spool_dir)
    bodies = [profile_body(n) for n in range(4)]
    for body in bodies:
        spool.add(body["id"], frames_of(body))
    victim = sorted(os.listdir(spool_dir))[1]
    raw = bytearray((spool_dir / victim).read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (spool_dir / victim).write_bytes(bytes(raw))

    store = FakeStore().start()
    try:
        with ShipperThread(tmp_path, store.address, env={"PARCA_AGENT_INSECURE": "true"}) as sh:
            assert wait_until(lambda: sh.metric("profiles_shipped_total") == 3)
            assert sh.metric("spool_corrupt_total") == 1
            assert sh.metric("spool_files") == 0
        arrived = Counter(raw for _, raw in store.raw_profiles())
    finally:
        store.stop()
    assert arrived == Counter(b["pprof"] for i, b in enumerate(bodies) if i != 1)
    assert any(r.levelno == logging.WARNING and victim in r.getMessage() for r in caplog.records)
