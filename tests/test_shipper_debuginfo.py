"""Debuginfo: the store is asked about each build id of the shipped profiles once and receives
its bytes once, from the binary cache or from the mapping's file."""

from __future__ import annotations

import shutil

import pytest

from services.shipper.debuginfo import elf_build_id, mapping_build_ids
from tests.helpers.store_server import (FakeStore, ShipperThread, make_pprof, profile_body,
                                        send_acked, wait_until)

CACHED_ID = "aabbccddeeff00112233445566778899aabbccdd"
MISSING_ID = "0123456789abcdef0123456789abcdef01234567"
ENV = {"PARCA_AGENT_INSECURE": "true"}


@pytest.fixture
def store():
    server = FakeStore().start()
    yield server
    server.stop()


def test_mapping_build_ids_come_from_the_pprof():
    found = mapping_build_ids(make_pprof(1, CACHED_ID.upper(), "/usr/lib/libfoo.so"))
    assert found == {CACHED_ID: "/usr/lib/libfoo.so"}
    assert mapping_build_ids(make_pprof(1, "", "/usr/lib/libfoo.so")) == {}
    assert mapping_build_ids(make_pprof(1, CACHED_ID, "[kernel.kallsyms]")) == {}


def test_cached_binary_is_asked_about_once_and_uploaded_once(tmp_path, store):
    binaries = tmp_path / "cache" / "binaries"
    binaries.mkdir(parents=True)
    content = bytes(range(256)) * 5000  # several upload chunks
    (binaries / CACHED_ID).write_bytes(content)
    with ShipperThread(tmp_path, store.address, env=ENV) as sh:
        sender = sh.sender()
        for n in range(3):  # three windows, three batches, one build id
            send_acked(sender, [profile_body(n, build_id=CACHED_ID),
                                profile_body(10 + n, build_id=MISSING_ID,
                                             filename="/nonexistent/lib.so")])
            assert wait_until(lambda: sh.metric("profiles_shipped_total") == 2 * (n + 1))
        assert wait_until(lambda: sh.metric("debuginfo_uploads_total") == 1)
        wait_until(lambda: False, 0.5)  # room for a second upload, which must not come
    assert store.received.should_initiate == [CACHED_ID]  # the missing one is never offered
    assert store.received.uploads == {CACHED_ID: [content]}
    assert store.received.finished == [CACHED_ID]
    record = (tmp_path / "cache" / "debuginfo-uploaded").read_text().split()
    assert record == [CACHED_ID]

    # After a restart the record keeps the store from being asked again.
    with ShipperThread(tmp_path, store.address, env=ENV) as sh:
        send_acked(sh.sender(), [profile_body(5, build_id=CACHED_ID)])
        assert wait_until(lambda: sh.metric("profiles_shipped_total") == 1)
        wait_until(lambda: False, 0.3)
    assert store.received.should_initiate == [CACHED_ID]


def test_readable_mapping_file_with_the_same_build_id_is_uploaded(tmp_path, store):
    binary = tmp_path / "true"
    shutil.copy("/bin/true", binary)
    build_id = elf_build_id(str(binary))
    if not build_id:
        pytest.skip("/bin/true has no GNU build id here")
    impostor = tmp_path / "impostor"
    impostor.write_bytes(b"\x7fELF not really")
    with ShipperThread(tmp_path, store.address, env=ENV) as sh:
        send_acked(sh.sender(), [
            profile_body(1, build_id=build_id, filename=str(binary)),
            profile_body(2, build_id=MISSING_ID, filename=str(impostor))])
        assert wait_until(lambda: sh.metric("debuginfo_uploads_total") == 1)
        assert wait_until(lambda: sh.metric("debuginfo_skipped_total", reason="no_file") == 1)
    assert store.received.uploads == {build_id: [binary.read_bytes()]}


def test_debuginfo_upload_off_asks_nothing(tmp_path, store):
    (tmp_path / "cache" / "binaries").mkdir(parents=True)
    (tmp_path / "cache" / "binaries" / CACHED_ID).write_bytes(b"binary")
    env = {**ENV, "PARCA_AGENT_DEBUGINFO_UPLOAD": "false"}
    with ShipperThread(tmp_path, store.address, env=env) as sh:
        send_acked(sh.sender(), [profile_body(1, build_id=CACHED_ID)])
        assert wait_until(lambda: sh.metric("profiles_shipped_total") == 1)
        wait_until(lambda: False, 0.3)
    assert store.received.should_initiate == []
