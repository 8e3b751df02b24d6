"""Discovery: which processes form which targets (Kubernetes containers, systemd units), published
as full snapshots on discovery.sock for the collector's in-kernel filter and the aggregator."""
