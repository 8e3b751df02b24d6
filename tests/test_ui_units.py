"""The UI's parts without processes: selectors, pprof merging and views, the stores, /metrics,
HTML escaping."""

from __future__ import annotations

import gzip
import threading
import time

import pytest

from services.runtime import Metrics
from services.ui import exposition, pages, profiles, selector
from services.ui.state import (MAX_WINDOWS_PER_TARGET, ServiceHealth, TargetStore, Window,
                               target_id)
from tests.helpers.ui_fakes import CHAIN, chain_pprof, make_pprof

# --- selectors ------------------------------------------------------------------------------


@pytest.mark.parametrize("text,labels,expected", [
    ('{comm="chain"}', {"comm": "chain", "pid": "1"}, True),
    ('{comm="chain"}', {"comm": "chained"}, False),
    ('{comm!="chain"}', {"comm": "other"}, True),
    ('{comm=~"ch.*"}', {"comm": "chain"}, True),
    ('{comm=~"ha"}', {"comm": "chain"}, False),  # anchored, as in PromQL
    ('{comm!~"ch.*", pid="1"}', {"comm": "x", "pid": "1"}, True),
    ('parca_agent_cpu{pid="7"}', {"__name__": "parca_agent_cpu", "pid": "7"}, True),
    ('parca_agent_cpu', {"__name__": "other"}, False),
    ('{ comm = "a\\"b" , }', {"comm": 'a"b'}, True),
    ("{comm='<img>'}", {"comm": "<img>"}, True),
    ('{missing=""}', {"comm": "x"}, True),  # an absent label is the empty string
])
def test_selector_matches_like_promql(text, labels, expected):
    assert selector.parse(text).matches(labels) is expected


@pytest.mark.parametrize("text,message", [
    ('{comm="chain"', "missing }"),
    ('{comm=chain}', "quoted value"),
    ('{comm~"x"}', "= != =~ !~"),
    ('{="x"}', "label name"),
    ('{comm="x" pid="1"}', "expected , or }"),
    ('{comm=~"("}', "bad regular expression"),
    ('{comm="x"} junk', "unexpected text"),
    ('{comm="\\q"}', "unknown escape"),
    ('{}', "empty selector"),
    ('{a="' + "x" * 5000 + '"}', "longer than"),
])
def test_selector_errors_say_what_is_wrong(text, message):
    with pytest.raises(selector.SelectorError, match=message):
        selector.parse(text)


def test_format_labels_round_trips_through_the_parser():
    labels = {"comm": 'we"ird\\na\nme', "pid": "1"}
    sel = selector.parse(selector.format_labels(labels))
    assert sel.matches(labels)
    assert not sel.matches({**labels, "pid": "2"})


# --- pprof ----------------------------------------------------------------------------------


def test_view_builds_the_flame_tree_and_top_table_from_the_chain():
    view = profiles.view(profiles.decode(chain_pprof()))
    assert (view.sample_type, view.unit) == ("cpu", "nanoseconds")
    assert view.total == 100 * 10_000_000
    node, path = view.flamegraph, []
    while node.get("children"):
        node = node["children"][0]
        path.append(node["name"])
    assert tuple(path) == CHAIN
    top = {row["name"]: row for row in view.top}
    assert top["leaf"]["flat"] == 90 * 10_000_000
    assert top["middle"]["cum"] == 97 * 10_000_000
    assert top["main"]["flat"] == 0 and top["main"]["cum"] == view.total
    assert view.top[0]["name"] == "leaf"


def test_merge_remaps_strings_and_ids_and_sums_values():
    # The two profiles number their strings, functions and locations differently.
    a = profiles.decode(make_pprof({("main", "alpha"): 5, ("main", "beta"): 1}))
    b = profiles.decode(make_pprof({("main", "beta"): 2, ("main", "gamma", "alpha"): 4}))
    merged = profiles.merge([a, b])
    round_trip = profiles.decode(profiles.encode(merged))
    top = {row["name"]: row for row in profiles.view(round_trip, sample_index=0).top}
    assert top["alpha"]["flat"] == 9
    assert top["beta"]["flat"] == 3
    assert top["gamma"]["cum"] == 4
    assert top["main"]["cum"] == 12
    # beta sits at different addresses in the two, so its locations and samples stay apart.
    assert len(round_trip.function) == 4 and len(round_trip.sample) == 4
    assert round_trip.string_table[0] == ""
    assert len(set(round_trip.string_table)) == len(round_trip.string_table)


def test_merge_of_equal_stacks_adds_their_samples():
    a = profiles.decode(make_pprof({("main", "alpha"): 5, ("main",): 1}))
    merged = profiles.merge([a, a, a])
    assert sorted(list(s.value) for s in merged.sample) == [[3, 30_000_000], [15, 150_000_000]]
    assert len(merged.location) == 2


def test_merge_leaves_out_profiles_of_other_sample_types():
    a = profiles.decode(make_pprof({("main",): 5}))
    other = profiles.decode(make_pprof({("main",): 7}))
    del other.sample_type[1]
    for s in other.sample:
        del s.value[1]
    merged = profiles.merge([a, other, a])
    assert sum(s.value[0] for s in merged.sample) == 10


def test_merge_keeps_the_span_of_all_windows():
    a = profiles.decode(make_pprof({("main",): 1}, time_ns=1_000, duration_ns=10))
    b = profiles.decode(make_pprof({("main",): 1}, time_ns=5_000, duration_ns=10))
    merged = profiles.merge([b, a])
    assert (merged.time_nanos, merged.duration_nanos) == (1_000, 4_010)


@pytest.mark.parametrize("blob,message", [
    (b"not gzip", "not gzip"),
    (b"\x1f\x8b\x08\x00garbage", "does not decompress"),
    (gzip.compress(b"\xff\xff\xff\xff"), "does not parse"),
])
def test_decode_refuses_what_is_not_a_pprof(blob, message):
    with pytest.raises(profiles.ProfileError, match=message):
        profiles.decode(blob)


def test_decode_stops_at_the_size_bound(monkeypatch):
    monkeypatch.setattr(profiles, "MAX_PROFILE_BYTES", 1000)
    with pytest.raises(profiles.ProfileError, match="larger than"):
        profiles.decode(gzip.compress(b"\x00" * 100_000))


def test_view_survives_dangling_ids():
    p = profiles.decode(chain_pprof())
    p.sample.add(location_id=[999], value=[1, 1])
    p.location.add(id=50, mapping_id=77, address=0x1234)  # no lines, no such mapping
    p.sample.add(location_id=[50], value=[1, 1])
    names = {row["name"] for row in profiles.view(p).top}
    assert {"unknown", "unknown 0x1234"} <= names


# --- stores ---------------------------------------------------------------------------------


def window(end_s: float, pid: str = "x", size: int = 10, received: float | None = None) -> Window:
    return Window(profile_id=f"{pid}-{end_s}", start_ns=int((end_s - 10) * 1e9),
                  end_ns=int(end_s * 1e9), pprof_gz=b"\x1f\x8b" + b"\x00" * (size - 2),
                  samples=1, received=received if received is not None else end_s)


def test_history_keeps_ten_minutes_and_ranges_count_back_from_the_latest():
    now = [1000.0]
    store = TargetStore(clock=lambda: now[0])
    labels = {"pid": "1"}
    for i in range(80):  # 800 s of 10 s windows
        now[0] = 1000.0 + 10 * i
        store.add(labels, window(now[0]))
    tid = target_id(labels)
    kept = store.get(tid).windows
    assert kept[-1].end_ns - kept[0].end_ns <= 600e9
    assert len(store.windows_in_range(tid, "latest")[1]) == 1
    assert len(store.windows_in_range(tid, "1m")[1]) == 6
    assert len(store.windows_in_range(tid, "5m")[1]) == 30
    assert store.total_bytes == 10 * len(kept)


def test_history_is_bounded_in_count():
    store = TargetStore(clock=lambda: 100.0)
    for i in range(MAX_WINDOWS_PER_TARGET + 50):
        store.add({"pid": "1"}, window(100.0 + i * 0.001))
    assert len(store.get(target_id({"pid": "1"})).windows) == MAX_WINDOWS_PER_TARGET


def test_total_bytes_are_bounded_oldest_first(monkeypatch):
    import services.ui.state as state
    monkeypatch.setattr(state, "MAX_TOTAL_BYTES", 1000)
    store = TargetStore(clock=lambda: 100.0)
    for i in range(30):
        store.add({"pid": str(i % 3)}, window(90.0 + i * 0.1, size=100, received=90.0 + i))
    assert store.total_bytes <= 1000
    for t in store.targets():  # every target keeps at least its latest window
        assert t.latest.profile_id.startswith("x-")
        assert t.latest.received >= 117


def test_targets_expire_when_not_seen():
    now = [100.0]
    store = TargetStore(clock=lambda: now[0])
    store.add({"pid": "old"}, window(100.0))
    now[0] = 100.0 + 301
    store.add({"pid": "new"}, window(now[0]))
    assert [t.labels["pid"] for t in store.targets()] == ["new"]
    assert store.total_bytes == 10


def test_wait_next_returns_only_a_later_matching_profile():
    store = TargetStore()
    store.add({"comm": "a"}, window(time.time()))
    sel = selector.parse('{comm="a"}')
    start = time.monotonic()
    assert store.wait_next(sel.matches, 0.3) is None  # one already there does not count
    assert time.monotonic() - start >= 0.29

    def publish():
        time.sleep(0.2)
        store.add({"comm": "b"}, window(time.time(), "b"))
        store.add({"comm": "a"}, window(time.time(), "a2"))
    threading.Thread(target=publish).start()
    found = store.wait_next(sel.matches, 5)
    assert found is not None and found[1].profile_id.startswith("a2")


def test_service_health_rates_and_liveness():
    now = [1000.0]
    health = ServiceHealth(clock=lambda: now[0])
    samples = "parca_agent_collector_samples_total"
    health.record("collector", 7, 1.0, [[samples, {}, 100.0]])
    now[0] += 2
    errors = "parca_agent_collector_stack_errors_total"
    health.record("collector", 7, 1.0, [[samples, {}, 500.0], [errors, {"kind": "a"}, 2],
                                        [errors, {"kind": "b"}, 3]])
    row = {s.name: health.summary(s) for s in health.services()}["collector"]
    assert row["alive"] and row["samples_per_second"] == 200.0 and row["stack_errors"] == 5
    now[0] += ServiceHealth.ALIVE_SECONDS - 3  # heartbeats late, but not three missed
    assert health.summary(health.services()[0])["alive"]
    now[0] += 3
    assert not health.summary(health.services()[0])["alive"]


def test_metrics_exposition_types_and_service_up():
    health = ServiceHealth(clock=time.time)
    health.record("collector", 7, 1.0, [["parca_agent_collector_samples_total", {}, 5],
                                        ["parca_agent_collector_map_fill", {"map": "counts"}, 0.5],
                                        ["bad name!", {}, 1], ["ok_total", {"bad-label": "x"}, 1]])
    text = exposition.render(exposition.registry(health)).decode()
    assert "# TYPE parca_agent_collector_samples_total counter" in text
    assert "parca_agent_collector_samples_total 5.0" in text
    assert 'parca_agent_collector_map_fill{map="counts"} 0.5' in text
    assert 'parca_agent_service_up{service="collector"} 1.0' in text
    assert 'parca_agent_service_up{service="shipper"} 0.0' in text
    assert "bad name" not in text and "bad-label" not in text


# --- pages ----------------------------------------------------------------------------------


def test_pages_escape_every_value():
    evil = "<img src=x onerror=alert(1)>"
    body = pages.render("target", evil, target_id="a" * 20, profile_type=evil,
                        labels=pages.label_chips({"comm": evil, evil: '"'}),
                        download_url='/x"><script>').decode()
    assert "<img" not in body and "<script>" not in body.replace(
        '<script src="/static/', "")
    assert "&lt;img src=x onerror=alert(1)&gt;" in body
    assert 'href="/x&quot;&gt;&lt;script&gt;"' in body


def test_metrics_names_reach_the_registry_unchanged():
    m = Metrics("parca_agent_ui")
    m.inc("http_requests_total", handler="index", code="200")
    health = ServiceHealth()
    health.record("ui", 1, 1.0, m.snapshot())
    text = exposition.render(exposition.registry(health)).decode()
    assert 'parca_agent_ui_http_requests_total{code="200",handler="index"} 1.0' in text


def test_expired_targets_are_looked_for_once_a_second_and_on_every_heartbeat():
    """Each profile no longer scans every target (that was most of the feed's work with a few
    hundred targets): a scan runs at most every EXPIRY_SCAN_SECONDS on adds, and always on
    expire() (the feed's heartbeat), so an expired target lingers at most that long."""
    from services.ui.state import EXPIRY_SCAN_SECONDS, TARGET_EXPIRY_SECONDS
    now = [100.0]
    store = TargetStore(clock=lambda: now[0])
    store.add({"pid": "old"}, window(100.0))
    now[0] = 100.0 + TARGET_EXPIRY_SECONDS - 0.5
    store.add({"pid": "a"}, window(now[0]))  # scans: "old" is not expired yet
    now[0] += EXPIRY_SCAN_SECONDS / 2 + 0.1  # "old" has expired, but the last scan is recent
    store.add({"pid": "b"}, window(now[0]))
    assert store.count() == 3
    store.expire()
    assert sorted(t.labels["pid"] for t in store.targets()) == ["a", "b"]
    store.add({"pid": "old"}, window(now[0]))
    now[0] += TARGET_EXPIRY_SECONDS + EXPIRY_SCAN_SECONDS  # all expired but the next one added
    store.add({"pid": "c"}, window(now[0]))
    assert [t.labels["pid"] for t in store.targets()] == ["c"]
    assert store.total_bytes == 10
