"""parca-agent tap: the reference subscriber of the raw sample stream.

Prints every message as a JSON line, or with ``--format=folded`` every sample as a folded
stack (``comm;outermost;...;innermost count``) that flame graph tools read. User frames are
named from the binaries when this process can read them, else shown as addresses.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import zmq

from services import runtime, wire
from services.settings import FLAGS_BY_ATTR


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    run_dir_flag = FLAGS_BY_ATTR["run_dir"]
    parser = argparse.ArgumentParser(
        prog="parca-agent tap",
        description="Print the collector's raw sample stream (see docs/wire.md).")
    parser.add_argument("--run-dir", default=os.environ.get(run_dir_flag.env, run_dir_flag.default),
                        help="the agent's run directory (default %(default)s)")
    parser.add_argument("--address", default="",
                        help="connect here instead, e.g. tcp://node:7071 (a --tap-address)")
    parser.add_argument("--format", choices=("json", "folded"), default="json",
                        help="json: one message per line; folded: one stack per line")
    parser.add_argument("--duration", type=float, default=0,
                        help="stop after this many seconds (0: run until interrupted)")
    parser.add_argument("--no-symbolize", action="store_true",
                        help="folded: show user frames as addresses")
    return parser.parse_args(argv)


class FoldedPrinter:
    def __init__(self, out, symbolize: bool):
        self.out = out
        self.processes: dict[int, dict] = {}
        self.symbolizer = None
        if symbolize:
            from services.aggregator.symbols import Symbolizer

            self.symbolizer = Symbolizer()

    def process(self, body: dict) -> None:
        self.processes[int(body["pid"])] = body

    def samples(self, body: dict) -> None:
        stacks = body["stacks"]
        kernel_names = body["kernel_symbols"]
        for pid, tid, _cgroup, u, k, count in body["records"]:
            meta = self.processes.get(pid)
            comm = meta["comm"] if meta else str(pid)
            frames = [self._user_name(meta, a, depth) for depth, a in enumerate(stacks[u])] \
                if u >= 0 else []
            frames = [kernel_names.get(a, hex(a)) + "_[k]" for a in (stacks[k] if k >= 0 else [])] \
                + frames
            # Folded stacks go root first; ';' and newlines would break the format.
            parts = [comm] + list(reversed(frames))
            line = ";".join(p.replace(";", ":").replace("\n", " ") for p in parts)
            self.out.write(f"{line} {count}\n")
        self.out.flush()

    def _user_name(self, meta: dict | None, address: int, depth: int) -> str:
        if meta is None or self.symbolizer is None:
            return hex(address)
        from services.aggregator.profile_builder import MappingInfo

        for m in meta["mappings"]:
            if m["start"] <= address < m["limit"]:
                mapping = MappingInfo(m["start"], m["limit"], m["offset"], m["path"],
                                      m["build_id"])
                lookup = address if depth == 0 else address - 1
                candidates = [p for p in (m.get("cache_path", ""), m["path"]) if p]
                frame = self.symbolizer.symbolize(mapping, candidates, [lookup]).get(lookup)
                if frame is not None and frame.function:
                    return frame.function
                return f"{os.path.basename(m['path'])}+{address - m['start'] + m['offset']:#x}"
        return hex(address)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    address = args.address or wire.endpoint(args.run_dir, wire.ENDPOINT_COLLECTOR)
    ctx = zmq.Context.instance()
    topics = [wire.TOPIC_SAMPLES, wire.TOPIC_PROCESS]
    if args.format == "json":
        topics.append(wire.TOPIC_HEARTBEAT)
    sock = runtime.sub_socket(ctx, [address], topics)
    stop = runtime.StopFlag().install(supervised=False)
    metrics = runtime.Metrics("parca_agent_tap")
    gaps = wire.GapCounter()
    import logging

    bad_log = runtime.RateLimitedLog(logging.getLogger("parca_agent.tap"))
    printer = FoldedPrinter(sys.stdout, not args.no_symbolize) if args.format == "folded" else None
    deadline = time.monotonic() + args.duration if args.duration else None
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    try:
        while not stop.is_set() and (deadline is None or time.monotonic() < deadline):
            if not poller.poll(200):
                continue
            while (msg := runtime.receive(sock, metrics, gaps, bad_log)) is not None:
                if printer is None:
                    sys.stdout.write(json.dumps({"topic": msg.topic.decode("ascii", "replace"),
                                                 "type": msg.type, "src": msg.src, "seq": msg.seq,
                                                 "ts": msg.ts, "body": msg.body},
                                                default=_jsonable) + "\n")
                    sys.stdout.flush()
                elif msg.type == "process":
                    printer.process(msg.body)
                elif msg.type == "samples":
                    printer.samples(msg.body)
    except BrokenPipeError:
        pass  # `parca-agent tap | head` closed its end: a normal way to stop
    finally:
        sock.close()
    if gaps.lost:
        print(f"parca-agent tap: {gaps.lost} messages lost (the reader was too slow)",
              file=sys.stderr)
    return 0


def _jsonable(value):
    if isinstance(value, (bytes, bytearray)):
        return value.hex()
    return str(value)


if __name__ == "__main__":
    sys.exit(main())
