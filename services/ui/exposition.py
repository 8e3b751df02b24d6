"""``/metrics``: every service's counters and gauges from its latest heartbeat, in Prometheus form.

The services do not serve HTTP themselves; their heartbeats carry their metrics to the UI, and this
collector re-exposes the latest values on each scrape. Names ending in ``_total`` are counters,
the rest gauges.
"""

from __future__ import annotations

import re

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.process_collector import ProcessCollector

from services.ui.state import ServiceHealth

_METRIC_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


class HeartbeatCollector:
    def __init__(self, health: ServiceHealth):
        self.health = health

    def collect(self):
        up = GaugeMetricFamily("parca_agent_service_up",
                               "1 while the service's heartbeats arrive, else 0.",
                               labels=["service"])
        last = GaugeMetricFamily("parca_agent_service_last_heartbeat_timestamp_seconds",
                                 "Unix time of the service's latest heartbeat.",
                                 labels=["service"])
        # One family per name; a name seen with two label sets from two services is one family.
        families: dict[str, dict[tuple, float]] = {}
        for state in self.health.services():
            up.add_metric([state.name], 1.0 if self.health.alive(state) else 0.0)
            if state.last_heartbeat:
                last.add_metric([state.name], state.last_heartbeat)
            for name, labels, value in state.metrics:
                if not _METRIC_NAME.match(name) or not all(_LABEL_NAME.match(k) for k in labels):
                    continue
                series = families.setdefault(name, {})
                series[tuple(sorted(labels.items()))] = float(value)
        yield up
        yield last
        for name in sorted(families):
            counter = name.endswith("_total")
            family_name = name[:-len("_total")] if counter else name
            family = (CounterMetricFamily if counter else GaugeMetricFamily)(
                family_name, f"{name}, from the service's heartbeat.")
            # add_sample, not add_metric: the series of one name may have different label names.
            for label_items, value in sorted(families[name].items()):
                family.add_sample(name, dict(label_items), value)
            yield family


def registry(health: ServiceHealth) -> CollectorRegistry:
    """The UI records its own heartbeats in ``health`` too, so its metrics come the same way."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(HeartbeatCollector(health))
    ProcessCollector(namespace="parca_agent_ui", registry=reg)
    return reg


def render(reg: CollectorRegistry) -> bytes:
    return generate_latest(reg)
