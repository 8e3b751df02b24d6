"""--sampling-ratio keeps a stable, hash-chosen share of the targets."""

from __future__ import annotations

from services.discovery import sampling
from services.discovery.targets import Target


def synthetic_targets(n: int) -> list[Target]:
    return [Target(labels={"node": "n1", "namespace": "ns", "pod": f"pod-{i}", "container": "app"})
            for i in range(n)]


def test_half_of_a_thousand_targets_is_kept_and_the_same_ones_twice():
    targets = synthetic_targets(1000)
    first = sampling.sample(targets, 0.5)
    second = sampling.sample(synthetic_targets(1000), 0.5)
    assert 450 <= len(first) <= 550
    assert [t.labels for t in first] == [t.labels for t in second]


def test_zero_keeps_none_and_one_keeps_all():
    targets = synthetic_targets(200)
    assert sampling.sample(targets, 0.0) == []
    assert sampling.sample(targets, 1.0) == targets


def test_raising_the_ratio_only_adds_targets():
    targets = synthetic_targets(500)
    low = {t.labels["pod"] for t in sampling.sample(targets, 0.2)}
    high = {t.labels["pod"] for t in sampling.sample(targets, 0.6)}
    assert low < high


def test_the_choice_ignores_label_order():
    a = {"node": "n1", "pod": "p", "container": "c"}
    b = dict(reversed(list(a.items())))
    assert sampling.label_fraction(a) == sampling.label_fraction(b)
