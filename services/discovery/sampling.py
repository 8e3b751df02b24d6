"""--sampling-ratio: a stable, hash-chosen share of the targets.

A target is kept when the hash of its sorted labels, read as a number in [0, 1), is below the
ratio. The hash depends on nothing but the labels, so the same targets are kept after a restart
and on every node, and raising the ratio only adds targets. The aggregator may call ``keep``
for the per-process targets it makes itself.
"""

from __future__ import annotations

import hashlib
from typing import Iterable, TypeVar

from services.discovery.targets import Target

T = TypeVar("T", bound=Target)


def label_fraction(labels: dict[str, str]) -> float:
    """A number in [0, 1) fixed by the labels alone."""
    text = "\x00".join(f"{k}={v}" for k, v in sorted(labels.items()))
    digest = hashlib.sha256(text.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def keep(labels: dict[str, str], ratio: float) -> bool:
    if ratio >= 1.0:
        return True
    if ratio <= 0.0:
        return False
    return label_fraction(labels) < ratio


def sample(targets: Iterable[T], ratio: float) -> list[T]:
    return [t for t in targets if keep(t.labels, ratio)]
