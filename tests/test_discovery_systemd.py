"""systemd units as targets, from real cgroups made by the test (no systemd here: the units'
directories are found under the cgroup mounts), and over D-Bus where systemd answers."""

from __future__ import annotations

import logging

import pytest

from services.discovery.service import Discovery
from services.discovery.systemd import dbus_control_groups
from services.runtime import Metrics
from tests.helpers.cgroups import (CgroupFactory, discovery_settings, real_mounts_or_skip,
                                   unique)

log = logging.getLogger("test.discovery")


@pytest.fixture
def factory():
    made = CgroupFactory(real_mounts_or_skip())
    yield made
    made.cleanup()


def discover(**values: str):
    return Discovery(discovery_settings(**values), log, Metrics("test")).snapshot()


def test_listed_unit_is_a_target_and_an_unlisted_one_is_not(factory):
    unit = unique("demo-") + ".service"
    demo = factory.make(f"system.slice/{unit}")
    inside = factory.process_in(demo)
    other = factory.make(f"system.slice/{unique('other-')}.service")
    outside = factory.process_in(other)

    snapshot = discover(systemd_units=unit)

    assert snapshot.filtering is True
    [target] = snapshot.targets
    assert target.labels == {"node": "test-node", "systemd_unit": unit}
    assert target.cgroup_ids == {demo.inode}
    assert inside.pid in target.pids
    assert outside.pid not in target.pids


def test_a_unit_that_stops_and_starts_again_is_followed(factory):
    unit = unique("demo-") + ".service"
    first = factory.make(f"system.slice/{unit}")
    first_process = factory.process_in(first)
    discovery = Discovery(discovery_settings(systemd_units=unit), log, Metrics("test"))
    [running] = discovery.snapshot().targets
    assert first_process.pid in running.pids

    first_process.kill()
    first_process.wait()
    first.remove()
    assert discovery.snapshot().targets == ()

    second = factory.make(f"system.slice/{unit}")
    second_process = factory.process_in(second)
    [again] = discovery.snapshot().targets
    assert again.pids == {second_process.pid}
    assert again.cgroup_ids == {second.inode}


def test_a_templated_unit_in_a_nested_slice_is_found(factory):
    name = unique("demo-")
    unit = f"{name}@1.service"
    cgroup = factory.make(f"system.slice/system-{name}.slice/{unit}")
    process = factory.process_in(cgroup)
    [target] = discover(systemd_units=unit).targets
    assert target.pids == {process.pid}
    assert target.cgroup_ids == {cgroup.inode}


def test_host_processes_flag_profiles_everything_besides_the_units(factory):
    unit = unique("demo-") + ".service"
    factory.process_in(factory.make(f"system.slice/{unit}"))
    snapshot = discover(systemd_units=unit, host_processes="true")
    assert snapshot.filtering is False
    assert [t.labels["systemd_unit"] for t in snapshot.targets] == [unit]


def test_plain_host_profiles_every_process_without_targets():
    snapshot = discover()
    assert snapshot.targets == ()
    assert snapshot.filtering is False


def test_cgroup_v1_only_host_gives_pids_and_no_cgroup_ids(tmp_path):
    unit_dir = tmp_path / "systemd" / "system.slice" / "demo.service"
    unit_dir.mkdir(parents=True)
    (tmp_path / "systemd" / "cgroup.procs").write_text("1\n")
    (unit_dir / "cgroup.procs").write_text("4242\n")
    snapshot = discover(systemd_units="demo.service", cgroup_path=str(tmp_path))
    [target] = snapshot.targets
    assert target.pids == {4242}
    assert target.cgroup_ids == frozenset()


def test_units_over_dbus_where_systemd_answers():
    try:
        control_groups = dbus_control_groups(("init.scope",))
    except Exception as e:
        pytest.skip(f"systemd does not answer on the D-Bus system bus here: {e}")
    assert control_groups["init.scope"] == "/init.scope"
    [target] = discover(systemd_units="init.scope").targets
    assert 1 in target.pids  # systemd itself runs in init.scope
