"""A target (labels, plus the cgroups and processes that make it) and the snapshot discovery
publishes: always the whole set, never a delta, so a subscriber that starts late is whole again
at the next snapshot."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Target:
    labels: dict[str, str]
    cgroup_ids: frozenset[int] = field(default_factory=frozenset)
    pids: frozenset[int] = field(default_factory=frozenset)

    def sort_key(self) -> tuple[tuple[str, str], ...]:
        return tuple(sorted(self.labels.items()))

    def to_wire(self) -> dict[str, Any]:
        return {"labels": dict(self.labels), "cgroup_ids": sorted(self.cgroup_ids),
                "pids": sorted(self.pids)}


@dataclass(frozen=True)
class Snapshot:
    targets: tuple[Target, ...]
    # True: profile only these targets. False: profile everything; samples outside every
    # target become one target per process in the aggregator.
    filtering: bool

    def to_wire(self) -> dict[str, Any]:
        ordered = sorted(self.targets, key=Target.sort_key)
        return {"targets": [t.to_wire() for t in ordered], "filtering": self.filtering}


def assemble(kubernetes: list[Target] | None, systemd: list[Target] | None,
             host_processes: bool) -> Snapshot:
    """Decide what is profiled from the sources that are active (None: inactive).

    An active source (Kubernetes with a reachable API, or listed systemd units) means only its
    targets are profiled, unless --host-processes asks for every other process too. With no
    active source every process is profiled, one target each, made by the aggregator.
    """
    if kubernetes is None and systemd is None:
        return Snapshot(targets=(), filtering=False)
    targets = tuple((kubernetes or []) + (systemd or []))
    return Snapshot(targets=targets, filtering=not host_processes)
