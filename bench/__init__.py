"""Benchmarks: the agent's cost beside `perf record` and bcc's profile tool, its pipeline's
throughput, start time and memory, stack fidelity, and the churn and load runs of reliability.

``python -m bench`` runs them all; ``python -m bench <name> [--duration S] [--repeats N]`` one.
Results land in bench/results/<name>.json and docs/benchmarks.md (docs/reliability.md for churn
and load) is rewritten from every result there.
"""
