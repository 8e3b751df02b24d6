"""The web UI: active profilers, flame graphs, pprof downloads, /query and /metrics.

``feed`` reads profiles and heartbeats from ZeroMQ into ``state``; ``server`` answers HTTP from
it. docs/ui.md documents the endpoints and the JSON keys.
"""
