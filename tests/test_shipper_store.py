"""The shipper against a real gRPC store: labels, pprof that `go tool pprof` reads, bearer
tokens, TLS (test CA, wrong certificate, skip-verify), Conprof, permanent errors."""

from __future__ import annotations

import logging
import os
import subprocess

import grpc
import pytest
import zmq

from services import runtime, wire

from tests.conftest import require_tool
from tests.helpers.certs import ca_signed_server_cert, self_signed_server_cert
from tests.helpers.store_server import (FakeStore, ShipperThread, profile_body, send_acked,
                                        wait_until)

TOKEN = "s3cret-token-value"


@pytest.fixture
def store():
    server = FakeStore().start()
    yield server
    server.stop()


def test_series_carry_target_labels_and_name(tmp_path, store):
    labels = {"node": "n1", "namespace": "default", "pod": "web-0", "container": "app"}
    bodies = [profile_body(1, labels), profile_body(2, labels), profile_body(3, {"pid": "7"})]
    with ShipperThread(tmp_path, store.address, env={"PARCA_AGENT_INSECURE": "true"}) as sh:
        send_acked(sh.sender(), bodies)
        assert wait_until(lambda: len(store.raw_profiles()) == 3)
        assert sh.metric("profiles_shipped_total") == 3
        assert wait_until(lambda: sh.metric("spool_files") == 0)
    got = store.raw_profiles()
    assert sorted(raw for _, raw in got) == sorted(b["pprof"] for b in bodies)
    by_raw = {raw: series_labels for series_labels, raw in got}
    assert by_raw[bodies[0]["pprof"]] == {**labels, "__name__": "parca_agent_cpu"}
    assert by_raw[bodies[2]["pprof"]] == {"pid": "7", "__name__": "parca_agent_cpu"}
    assert os.listdir(tmp_path / "cache" / "spool") == []


def test_raw_profile_is_a_pprof_go_tool_pprof_reads(tmp_path, store):
    go = require_tool("go")
    with ShipperThread(tmp_path, store.address, env={"PARCA_AGENT_INSECURE": "true"}) as sh:
        send_acked(sh.sender(), [profile_body(1)])
        assert wait_until(lambda: len(store.raw_profiles()) == 1)
    path = tmp_path / "shipped.pb.gz"
    path.write_bytes(store.raw_profiles()[0][1])
    result = subprocess.run([go, "tool", "pprof", "-raw", str(path)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "work" in result.stdout and "main" in result.stdout
    assert "/usr/bin/workload" in result.stdout


def test_bearer_token_from_flag_arrives_and_is_never_logged(tmp_path, store, caplog):
    caplog.set_level(logging.DEBUG)
    env = {"PARCA_AGENT_INSECURE": "true", "PARCA_AGENT_BEARER_TOKEN": TOKEN}
    with ShipperThread(tmp_path, store.address, env=env) as sh:
        send_acked(sh.sender(), [profile_body(1)])
        assert wait_until(lambda: len(store.raw_profiles()) == 1)
    assert store.received.authorization == [f"Bearer {TOKEN}"]
    assert TOKEN not in caplog.text


def test_bearer_token_file_is_reread_when_rotated(tmp_path, store):
    token_file = tmp_path / "token"
    token_file.write_text("first-token\n")
    env = {"PARCA_AGENT_INSECURE": "true", "PARCA_AGENT_BEARER_TOKEN_FILE": str(token_file)}
    with ShipperThread(tmp_path, store.address, env=env) as sh:
        sender = sh.sender()
        send_acked(sender, [profile_body(1)])
        assert wait_until(lambda: len(store.raw_profiles()) == 1)
        # Rotation as Kubernetes does it: a new file moved into place.
        (tmp_path / "token.new").write_text("second-token-rotated\n")
        os.replace(tmp_path / "token.new", token_file)
        send_acked(sender, [profile_body(2)])
        assert wait_until(lambda: len(store.raw_profiles()) == 2)
    assert store.received.authorization == ["Bearer first-token", "Bearer second-token-rotated"]


def test_tls_with_the_test_ca(tmp_path):
    cert = ca_signed_server_cert()
    store = FakeStore(tls=(cert.cert_pem, cert.key_pem)).start()
    try:
        env = {"PARCA_AGENT_BEARER_TOKEN": TOKEN}
        with ShipperThread(tmp_path, f"localhost:{store.port}", env=env,
                           root_certificates=cert.ca_pem) as sh:
            send_acked(sh.sender(), [profile_body(1)])
            assert wait_until(lambda: len(store.raw_profiles()) == 1)
        assert store.received.authorization == [f"Bearer {TOKEN}"]
    finally:
        store.stop()


def test_wrong_certificate_fails_clearly_unless_skip_verify(tmp_path, caplog):
    cert = self_signed_server_cert()
    store = FakeStore(tls=(cert.cert_pem, cert.key_pem)).start()
    try:
        with ShipperThread(tmp_path / "verify", store.address,
                           root_certificates=ca_signed_server_cert().ca_pem) as sh:
            send_acked(sh.sender(), [profile_body(1)])
            assert wait_until(lambda: sh.metric("ship_failures_total", code="TLS") >= 2)
            assert sh.metric("profiles_shipped_total") == 0
            assert sh.metric("spool_files") == 1  # kept for when the certificate is fixed
        assert store.raw_profiles() == []
        assert "certificate is not trusted" in caplog.text
        assert "--insecure-skip-verify" in caplog.text

        env = {"PARCA_AGENT_INSECURE_SKIP_VERIFY": "true"}
        with ShipperThread(tmp_path / "skip", store.address, env=env) as sh:
            send_acked(sh.sender(), [profile_body(2)])
            assert wait_until(lambda: len(store.raw_profiles()) == 1)
    finally:
        store.stop()


def test_conprof_protocol_writes_write_request(tmp_path, store):
    labels = {"node": "n1", "systemd_unit": "nginx.service"}
    bodies = [profile_body(1, labels), profile_body(2, labels)]
    env = {"PARCA_AGENT_INSECURE": "true", "PARCA_AGENT_STORE_PROTOCOL": "conprof"}
    with ShipperThread(tmp_path, store.address, env=env) as sh:
        send_acked(sh.sender(), bodies)
        assert wait_until(lambda: sh.metric("profiles_shipped_total") == 2)
    samples = [(({l.name: l.value for l in series.labels}), sample)
               for request in store.received.conprof for series in request.profileSeries
               for sample in series.samples]
    assert len(samples) == 2
    for (series_labels, sample), body in zip(samples, bodies):
        assert series_labels == {**labels, "__name__": "parca_agent_cpu"}
        assert sample.value == body["pprof"]
        assert sample.timestamp == body["end_ns"] // 1_000_000
    assert store.received.parca == []


def test_unauthenticated_drops_the_batch_with_one_clear_line(tmp_path, store, caplog):
    store.fail_with = grpc.StatusCode.UNAUTHENTICATED
    env = {"PARCA_AGENT_INSECURE": "true", "PARCA_AGENT_BEARER_TOKEN": TOKEN}
    with ShipperThread(tmp_path, store.address, env=env) as sh:
        send_acked(sh.sender(), [profile_body(1)])
        assert wait_until(
            lambda: sh.metric("profiles_dropped_total", reason="UNAUTHENTICATED") == 1)
        calls = len(store.received.authorization)
        wait_until(lambda: False, 1.0)  # ten send intervals: no retry may happen
        assert len(store.received.authorization) == calls == 1
        assert sh.metric("ship_failures_total", code="UNAUTHENTICATED") == 1
        assert sh.metric("spool_files") == 0
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert "UNAUTHENTICATED" in errors[0] and "--bearer-token" in errors[0]
    assert TOKEN not in caplog.text


def test_without_store_address_profiles_are_acked_and_discarded(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    with ShipperThread(tmp_path, "") as sh:
        send_acked(sh.sender(), [profile_body(1), profile_body(2)])
        assert sh.metric("profiles_discarded_total") == 2
    assert "profiles stay local" in caplog.text
    assert not (tmp_path / "cache" / "spool").exists()


def test_heartbeat_publishes_the_shipper_metrics(tmp_path, store):
    with ShipperThread(tmp_path, store.address, env={"PARCA_AGENT_INSECURE": "true"}) as sh:
        sub = runtime.sub_socket(zmq.Context.instance(),
                                 [wire.endpoint(sh.settings.run_dir, wire.ENDPOINT_SHIPPER_PUB)],
                                 [b"heartbeat.shipper"])
        try:
            send_acked(sh.sender(), [profile_body(1)])
            assert wait_until(lambda: sh.metric("profiles_shipped_total") == 1)
            names: set = set()
            for _ in range(3):  # one may have left before this profile was counted
                assert sub.poll(int(runtime.HEARTBEAT_INTERVAL * 2000))
                msg = wire.decode(sub.recv_multipart())
                names = {name for name, _labels, _value in msg.body["metrics"]}
                if "parca_agent_shipper_profiles_shipped_total" in names:
                    break
        finally:
            sub.close()
    assert msg.body["service"] == "shipper"
    assert {"parca_agent_shipper_spool_files", "parca_agent_shipper_profiles_received_total",
            "parca_agent_shipper_profiles_shipped_total"} <= names
