"""systemd units as targets (``--systemd-units``), labeled ``node`` and ``systemd_unit``.

A unit's control group comes from systemd over D-Bus (pystemd) where systemd answers. Where it
does not (in containers, or on hosts where systemd is not PID 1) the unit's directory is found
under the cgroup mounts: units sit directly under a slice (``system.slice/<unit>``,
``system.slice/system-foo.slice/foo@1.service``), on the v2 mount and in the v1 ``name=systemd``
hierarchy alike. Every scan looks again, so a unit that stops and starts (a new directory, a new
cgroup id) is followed.
"""

from __future__ import annotations

import logging
import os
import time

from services.discovery import cgroups
from services.discovery.targets import Target
from services.runtime import Metrics

# After D-Bus failed, wait this long before asking again: opening the bus is cheap, but a host
# without it would log and count the same failure on every scan.
DBUS_RETRY_SECONDS = 60.0


def dbus_control_groups(units: tuple[str, ...]) -> dict[str, str | None]:
    """Each unit's ControlGroup (a path like ``/system.slice/x.service``) as systemd reports
    it, None for a unit without one (not loaded, not running). Raises when D-Bus or systemd
    cannot be reached."""
    from pystemd.dbuslib import DBus  # imported late: only hosts with units configured need it
    from pystemd.systemd1 import Unit

    found: dict[str, str | None] = {}
    with DBus() as bus:
        for name in units:
            unit = Unit(name.encode(), bus=bus, _autoload=True)
            try:
                # Service, Scope, Slice, Socket, Mount and Swap units have one; others do not.
                value = unit.ControlGroup
            except AttributeError:
                value = b""
            text = value.decode() if isinstance(value, bytes) else str(value or "")
            found[name] = text or None
    return found


def find_unit_dir(mount: str, unit: str) -> str | None:
    """The unit's cgroup path relative to the mount (``/system.slice/x.service``), searched
    among slices only: that is where systemd puts units, and it keeps the walk away from the
    many directories below each unit and container."""
    if os.path.isdir(os.path.join(mount, "system.slice", unit)):
        return "/system.slice/" + unit
    pending = [mount]
    while pending:
        directory = pending.pop()
        try:
            entries = list(os.scandir(directory))
        except OSError:
            continue
        for entry in entries:
            if not entry.is_dir(follow_symlinks=False):
                continue
            if entry.name == unit:
                return "/" + os.path.relpath(entry.path, mount)
            if entry.name.endswith(".slice"):
                pending.append(entry.path)
    return None


class SystemdUnits:
    """Finds the listed units' cgroups and processes on every scan."""

    def __init__(self, units: tuple[str, ...], node: str, mounts: cgroups.CgroupMounts,
                 log: logging.Logger, metrics: Metrics, use_dbus: bool = True):
        self.units = units
        self.node = node
        self.mounts = mounts
        self.log = log
        self.metrics = metrics
        self._dbus_retry_at = 0.0 if use_dbus else float("inf")
        self._dbus_logged = False

    def _control_groups(self) -> dict[str, str | None]:
        if time.monotonic() >= self._dbus_retry_at:
            try:
                return dbus_control_groups(self.units)
            except Exception as e:  # pystemd raises its own types for every D-Bus failure
                self.metrics.inc("systemd_dbus_errors_total")
                self._dbus_retry_at = time.monotonic() + DBUS_RETRY_SECONDS
                if not self._dbus_logged:
                    self.log.warning("systemd does not answer on D-Bus (%s); finding units' "
                                     "cgroups under the cgroup mounts instead", e)
                    self._dbus_logged = True
        return {unit: self._search_mounts(unit) for unit in self.units}

    def _search_mounts(self, unit: str) -> str | None:
        for mount in (self.mounts.unified, self.mounts.systemd_v1):
            if mount is not None and (path := find_unit_dir(mount, unit)):
                return path
        return None

    def targets(self) -> list[Target]:
        found = []
        for unit, path in self._control_groups().items():
            if path is None:
                continue
            ids: set[int] = set()
            pids: set[int] = set()
            if self.mounts.unified is not None:
                directory = cgroups.in_mount(self.mounts.unified, path)
                if os.path.isdir(directory):
                    ids = cgroups.cgroup_ids(directory)
                    pids |= cgroups.pids_under(directory)
            if self.mounts.systemd_v1 is not None:
                pids |= cgroups.pids_under(cgroups.in_mount(self.mounts.systemd_v1, path))
            if not pids:
                continue  # stopped: its directory is empty or gone
            found.append(Target(labels={"node": self.node, "systemd_unit": unit},
                                cgroup_ids=frozenset(ids), pids=frozenset(pids)))
        return found
