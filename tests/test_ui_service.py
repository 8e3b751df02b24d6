"""The UI as a process, over real sockets and real HTTP: a fake pipeline publishes real profiles
and heartbeats at the endpoint paths, and the tests read what the UI serves."""

from __future__ import annotations

import json
import re
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.parse

import pytest

from services import wire
from services.ui import profiles
from tests.conftest import require_tool
from tests.helpers.ui_fakes import CHAIN_LABELS, EVIL, UIProcess, running_ui

SELECTOR_CHAIN = '{comm="chain", pid="4242"}'


@pytest.fixture(scope="module")
def run_dir():
    # Short: ipc:// paths must fit in a unix socket address (about 100 bytes).
    path = tempfile.mkdtemp(prefix="ui-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def ui(run_dir):
    # Two-second windows make /query's timeout (a window and a second) three seconds.
    with running_ui(run_dir, PARCA_AGENT_PROFILING_DURATION="2s") as (ui, pipeline):
        ui.pipeline = pipeline
        yield ui


def q(selector: str, **extra: str) -> str:
    return "/query?" + urllib.parse.urlencode({"query": selector, **extra})


def chain_target(ui) -> dict:
    targets = json.loads(ui.get("/api/targets")[2])["targets"]
    return next(t for t in targets if t["labels"].get("comm") == "chain")


def test_api_targets_lists_each_target_with_the_documented_keys(ui):
    status, headers, body = ui.get("/api/targets")
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    targets = json.loads(body)["targets"]
    for t in targets:
        assert {"labels", "last_profile_time", "error", "profile_url"} <= set(t)
    chain = chain_target(ui)
    assert chain["labels"] == CHAIN_LABELS
    assert chain["error"] is None
    assert abs(chain["last_profile_time"] - time.time()) < 10
    assert chain["profile_url"].startswith("/")
    # The target's own selector finds it through /query.
    assert ui.get(q(chain["selector"]))[0] == 200


def test_go_tool_pprof_reads_the_profile_url_as_it_is(ui):
    go = require_tool("go")
    url = ui.base + chain_target(ui)["profile_url"]
    out = subprocess.run([go, "tool", "pprof", "-top", url], capture_output=True, text=True,
                         timeout=120, env=dict(os.environ, PPROF_TMPDIR=tempfile.mkdtemp()))
    assert out.returncode == 0, out.stderr
    top = out.stdout.splitlines()
    leaf_line = next(line for line in top if line.split()[-1:] == ["leaf"])
    assert "90.00%" in leaf_line  # the leaf's flat share in chain_pprof


def test_profile_download_of_a_range_merges_windows(ui):
    status, headers, body = ui.get(chain_target(ui)["profile_url"] + "?range=1m")
    assert status == 200
    assert headers["Content-Disposition"] == 'attachment; filename="profile.pb.gz"'
    view = profiles.view(profiles.decode(body), sample_index=0)
    # Each window of chain_pprof holds 100 samples; a minute at 0.5 s a window holds several.
    assert view.total > 100 and view.total % 100 == 0
    assert view.top[0]["name"] == "leaf"


def test_query_answers_the_next_matching_profile_as_pprof(ui):
    status, headers, body = ui.get(q(SELECTOR_CHAIN))
    assert status == 200
    assert headers["Content-Disposition"] == 'attachment; filename="profile.pb.gz"'
    assert {row["name"] for row in profiles.view(profiles.decode(body)).top} >= {"leaf", "main"}


def test_query_with_debug_shows_a_page_with_a_download_link(ui):
    status, headers, body = ui.get(q(SELECTOR_CHAIN, debug="1"))
    html = body.decode()
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    link = html.split('href="/api/profile/')[1].split('"')[0]
    assert ui.get("/api/profile/" + link.replace("&amp;", "&"))[0] == 200
    assert "{comm=&quot;chain&quot;, pid=&quot;4242&quot;}" in html


def test_query_that_matches_nothing_answers_404_within_its_timeout(ui):
    start = time.monotonic()
    status, _, body = ui.get(q('{comm="no-such-process"}'))
    elapsed = time.monotonic() - start
    assert status == 404 and b"no profile matched" in body
    assert 2.5 < elapsed < 6


@pytest.mark.parametrize("selector", ['{comm="chain"', "{comm=chain}", '{comm=~"("}', ""])
def test_bad_selector_answers_400_with_the_reason(ui, selector):
    status, headers, body = ui.get(q(selector))
    assert status == 400
    assert headers["Content-Type"].startswith("text/plain")
    assert b"selector" in body or b"missing query" in body


def test_bad_selector_is_not_reflected_as_html(ui):
    status, headers, body = ui.get(q('{a="<script>alert(1)</script>" b}', debug="1"))
    assert status == 400 and headers["Content-Type"].startswith("text/plain")
    assert headers["X-Content-Type-Options"] == "nosniff"


def test_metrics_exposes_every_services_heartbeat_metrics(ui):
    status, headers, body = ui.get("/metrics")
    text = body.decode()
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    assert "# TYPE parca_agent_collector_samples_total counter" in text
    assert 'parca_agent_collector_stack_errors_total{kind="user_stack_collisions"} 3.0' in text
    assert 'parca_agent_collector_messages_dropped_total{socket="collector"} 2.0' in text
    assert "parca_agent_shipper_spool_bytes 1234.0" in text
    for service in ("collector", "discovery", "aggregator", "shipper", "ui"):
        assert f'parca_agent_service_up{{service="{service}"}} 1.0' in text
    assert "parca_agent_ui_profiles_received_total" in text


def test_healthz_answers_ok(ui):
    assert ui.get("/healthz")[:3:2] == (200, b"ok\n")


def test_api_services_reports_health_from_heartbeats(ui):
    services = {s["service"]: s for s in json.loads(ui.get("/api/services")[2])["services"]}
    collector = services["collector"]
    assert collector["alive"] and collector["stack_errors"] == 3 and collector["drops"] == 2
    assert collector["samples_per_second"] > 0


def test_flamegraph_api_serves_the_tree_and_checks_its_arguments(ui):
    target = chain_target(ui)
    data = json.loads(ui.get(f"/api/flamegraph/{target['id']}?range=5m")[2])
    assert data["windows"] > 1
    names = json.dumps(data["flamegraph"])
    assert all(f'"{n}"' in names for n in ("main", "outer", "middle", "leaf"))
    assert ui.get(f"/api/flamegraph/{target['id']}?range=2h")[0] == 400
    assert ui.get("/api/flamegraph/" + "0" * 20)[0] == 404
    assert ui.get("/api/profile/..%2f..%2fetc%2fpasswd.pb.gz")[0] == 404
    assert ui.get("/static/..%2fserver.py")[0] == 404


def test_every_answer_carries_the_security_headers(ui):
    for path in ("/", "/api/targets", "/nowhere", q("{")):
        headers = ui.get(path)[1]
        assert "script-src 'self'" in headers["Content-Security-Policy"]
        assert "unsafe-inline" not in headers["Content-Security-Policy"]
        assert headers["X-Content-Type-Options"] == "nosniff"


def test_hostile_labels_are_escaped_in_the_raw_html(ui):
    targets = json.loads(ui.get("/api/targets")[2])["targets"]
    evil = next(t for t in targets if t["labels"].get("comm") == EVIL)
    html = ui.get(evil["page_url"])[2].decode()
    assert "&lt;img src=x onerror=alert(1)&gt;" in html
    assert "<img" not in html
    debug = ui.get(q('{pid="666"}', debug="1"))[2].decode()
    assert "&lt;img src=x onerror=alert(1)&gt;" in debug and "<img" not in debug


def test_malformed_messages_are_counted_and_do_not_stop_the_ui(ui):
    pipeline = ui.pipeline
    pipeline.send_raw("aggregator", [b"profile", b"\xc1garbage", b"x"])
    pipeline.send_raw("aggregator", [b"profile"])
    bad = wire.Publisher("aggregator").encode("profile", {
        "id": "bad", "labels": {"pid": 5}, "start_ns": 0, "end_ns": 1, "pprof": b"", "samples": 0})
    pipeline.send_raw("aggregator", bad)
    batcher = wire.Publisher("fuzz")
    pipeline.send_raw("aggregator", batcher.encode("profiles", {"id": "b", "profiles": 7}))
    good = {"id": "ok", "labels": {"pid": "4242"}, "start_ns": 0, "end_ns": 1,
            "pprof": b"\x1f\x8b", "samples": 1}
    # A batch with a bad entry: the entry is counted, the good one beside it still taken.
    pipeline.send_raw("aggregator", batcher.encode("profiles", {"id": "b2", "profiles": [
        {"id": "no-labels"}, "not a map", good]}))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        text = ui.get("/metrics")[2].decode()
        bad = re.search(r'messages_malformed_total\{reason="bad_profile"\} (\S+)', text)
        # 3: the single bad profile, and the two bad entries of the batch.
        if all(r in text for r in ('reason="bad_header"', 'reason="frame_count"',
                                   'reason="bad_profiles"')) and bad and float(
                bad.group(1)) >= 3 and any(
                t["labels"].get("pid") == "4242"
                for t in json.loads(ui.get("/api/targets")[2])["targets"]):
            break
        time.sleep(0.3)
    else:
        pytest.fail("the malformed messages were not counted")
    assert ui.get("/healthz")[0] == 200
    assert json.loads(ui.get("/api/targets")[2])["targets"]


def test_bad_http_requests_do_not_stop_the_ui(ui):
    for raw in (b"GARBAGE\r\n\r\n", b"GET /" + b"a" * 70000 + b" HTTP/1.0\r\n\r\n",
                b"POST /api/targets HTTP/1.0\r\nContent-Length: 3\r\n\r\nabc", b"\xff\xfe\r\n\r\n"):
        with socket.create_connection(("127.0.0.1", ui.port), timeout=10) as s:
            s.sendall(raw)
            answer = s.recv(100)
            # An unparsable request line gets an HTTP/0.9 answer (no status line), still a 400.
            assert any(code in answer[:40] for code in (b"400 ", b"414 ", b"501 "))
    assert ui.get("/healthz")[0] == 200


def test_sigterm_stops_the_ui_quickly_with_status_zero():
    run_dir = tempfile.mkdtemp(prefix="ui-", dir="/tmp")
    try:
        ui = UIProcess(run_dir)
        start = time.monotonic()
        ui.proc.send_signal(signal.SIGTERM)
        assert ui.proc.wait(10) == 0
        # Well under STOP_WAIT (3 s): the HTTP server, which sleeps without a poll interval,
        # was woken to stop rather than waited for.
        assert time.monotonic() - start < 2.5
        ui.stop()
        assert not os.path.exists(os.path.join(run_dir, wire.ENDPOINT_UI_PUB))
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
