"""python -m bench [all|overhead|pipeline|start|fidelity|churn|load|report] [options]

Without a name every benchmark runs in turn (about an hour with the defaults); `report` only
rewrites docs/benchmarks.md and docs/reliability.md from bench/results/. Each benchmark saves
its result and rewrites the docs at once, so an interrupted run keeps what it measured.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from bench import report
from bench.common import log, save

# Modules by benchmark name; each has NAME, add_arguments(parser) and run(args) -> dict.
BENCHMARKS = {
    "overhead": "bench.overhead",
    "pipeline": "bench.pipeline",
    "start": "bench.start_memory",
    "fidelity": "bench.fidelity",
    "churn": "bench.churn",
    "load": "bench.load",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m bench",
                                     description=" ".join(__doc__.splitlines()[2:4]))
    sub = parser.add_subparsers(dest="name")
    modules = {name: importlib.import_module(path) for name, path in BENCHMARKS.items()}
    for name, module in modules.items():
        module.add_arguments(sub.add_parser(name, help=module.__doc__.splitlines()[0]))
    everything = sub.add_parser("all", help="every benchmark with its defaults")
    everything.add_argument("--skip", default="", help="comma-separated benchmarks to leave out")
    sub.add_parser("report", help="rewrite the docs from bench/results/")
    args = parser.parse_args(argv)
    if args.name == "report":
        report.write()
        return 0
    if os.geteuid() != 0:
        print("python -m bench: run as root (BPF, perf events, the agent)", file=sys.stderr)
        return 1
    if args.name in modules:
        chosen = [(args.name, args)]
    else:
        skip = set(filter(None, getattr(args, "skip", "").split(",")))
        chosen = []
        for name in modules:
            if name not in skip:
                sub_args = argparse.Namespace()
                modules[name].add_arguments(_Collector(sub_args))
                chosen.append((name, sub_args))
    failed = 0
    for name, sub_args in chosen:
        log(f"{name}: starting")
        try:
            result = modules[name].run(sub_args)
        except Exception as e:  # the next benchmark still runs; this one is reported failed
            log(f"{name}: failed: {type(e).__name__}: {e}")
            failed += 1
            continue
        save(name, result, short=result.pop("short", False))
        report.write()
    return 1 if failed else 0


class _Collector:
    """Stands in for a parser to fill a namespace with a benchmark's defaults."""

    def __init__(self, namespace: argparse.Namespace):
        self.namespace = namespace

    def add_argument(self, *names, default=None, **_kwargs):
        dest = names[0].lstrip("-").replace("-", "_")
        setattr(self.namespace, dest, default)


if __name__ == "__main__":
    sys.exit(main())
