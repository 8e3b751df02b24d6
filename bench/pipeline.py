"""Pipeline: the aggregator's records per second, the window build time, the collector's drain.

- Aggregator: `python -m services.aggregator` (and the shipper it sends profiles to) against a
  PUB socket bound where the collector's would be, in a temporary run directory. The bench sends
  bursts of synthetic `samples` batches (user frames inside a real binary, so symbolization is
  real work) back to back for the duration, each once the aggregator has gone idle after the
  previous one (its threads' CPU time in /proc/<pid>/task/*/schedstat stops growing), so its
  queue stays short. Records per CPU-second: everything sent over the aggregator's CPU time
  from the first burst until its heartbeat has counted every record (each counts one sample)
  and it has built every window they opened (10 s windows): window closes are part of the cost.
  The socket blocks instead of dropping (XPUB_NODROP), so nothing is lost or counted twice.
- Window build: bench/bench_window_build.py (the aggregator's add and close of a window of
  50,000 distinct stacks of 20 frames, real ELF files symbolized) in its own process.
- Collector drain: the real CpuSampler (BPF loaded, events attached, at 1000 Hz so that its
  count map has room) with 10,000 synthetic entries written into its count map from user
  space, then drain_counts() timed.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time

import zmq

from bench.common import ROOT, cpu_seconds, cpu_seconds_precise, log, median, status_mb, table
from bench.workloads import work_dir

NAME = "pipeline"
DEFAULT_DURATION = 30.0
RECORDS_PER_BATCH = 1000
BATCHES_PER_BURST = 100
PROCESSES = 50
USER_STACKS = 20_000  # distinct stacks drawn from: a window's tables stay bounded
DEPTH = 20
IDLE_S = 0.03  # no CPU used for this long: the aggregator has taken the burst


def add_arguments(parser) -> None:
    parser.add_argument("--duration", type=float, default=DEFAULT_DURATION,
                        help="seconds of aggregator bursts (default %(default)s)")


# --- the aggregator -----------------------------------------------------------------------------

def _synthetic_inputs(rng: random.Random):
    """Process messages and a few samples bodies whose user frames fall in a real binary.

    Each process maps the binary at its own address (as ASLR does), so no two processes share
    a layout and the aggregator works out every process's addresses on their own."""
    binary = os.path.realpath(sys.executable)
    size = os.path.getsize(binary)
    span = (size + 0xfff_ffff) & ~0xfff_ffff
    starts = [0x55_0000_0000 + p * span for p in range(PROCESSES)]
    processes = [{"pid": 900_000 + p, "start_time": 1, "comm": f"bench{p}",
                  "executable": binary, "cmdline": [],
                  "mappings": [{"start": starts[p], "limit": starts[p] + size, "offset": 0,
                                "path": binary, "build_id": "", "cache_path": ""}]}
                 for p in range(PROCESSES)]
    pool = [[rng.randrange(0x1000, size) for _ in range(DEPTH)]  # offsets into the binary
            for _ in range(USER_STACKS)]
    kernel = [[0xffff_ffff_8100_0000 + rng.randrange(0, 1 << 20) for _ in range(5)]
              for _ in range(100)]
    kernel_symbols = {a: f"kernel_fn_{a & 0xfff}" for k in kernel for a in k}
    bodies = []
    for _ in range(8):
        chosen = rng.sample(range(USER_STACKS), RECORDS_PER_BATCH)
        pids = [rng.randrange(PROCESSES) for _ in range(RECORDS_PER_BATCH)]
        stacks = [[starts[p] + offset for offset in pool[i]] for p, i in zip(pids, chosen)]
        records = [[900_000 + p, 1, 1, i, RECORDS_PER_BATCH + rng.randrange(len(kernel)), 1]
                   for i, p in enumerate(pids)]
        bodies.append({"time_ns": 0, "duration_ns": 1_000_000_000, "frequency": 100,
                       "records": records, "stacks": stacks + kernel,
                       "kernel_symbols": kernel_symbols, "errors": {}})
    return processes, bodies


class _Heartbeats:
    def __init__(self, ctx, run_dir: str):
        from services import runtime, wire

        self.wire = wire
        self.sock = runtime.sub_socket(ctx, [wire.endpoint(run_dir, wire.ENDPOINT_AGGREGATOR)],
                                       [b"heartbeat.aggregator"])
        self.metrics: dict[str, float] = {}

    def poll(self, timeout_ms: int = 0) -> None:
        while self.sock.poll(timeout_ms):
            timeout_ms = 0
            msg = self.wire.decode(self.sock.recv_multipart())
            totals: dict[str, float] = {}
            for name, _labels, value in msg.body["metrics"]:
                totals[name] = totals.get(name, 0.0) + value
            self.metrics = totals

    def get(self, name: str) -> float:
        return self.metrics.get(f"parca_agent_aggregator_{name}", 0.0)


def aggregator_throughput(duration: float) -> dict:
    from services import wire
    from tests.helpers.services import service_env, start_service, stop

    base = work_dir()
    run_dir, cache_dir = os.path.join(base, "run"), os.path.join(base, "cache")
    os.makedirs(run_dir)
    env = service_env(run_dir, cache_dir, log_level="warn")
    ctx = zmq.Context()
    pub = ctx.socket(zmq.XPUB)
    pub.setsockopt(zmq.XPUB_NODROP, 1)  # block when the aggregator is behind: no drops
    pub.setsockopt(zmq.SNDHWM, 20)
    pub.bind(wire.endpoint(run_dir, wire.ENDPOINT_COLLECTOR))
    heartbeats = _Heartbeats(ctx, run_dir)
    log_path = os.path.join(base, "services.log")
    shipper = start_service("shipper", env, log_path)
    aggregator = start_service("aggregator", env, log_path)
    publisher = wire.Publisher("collector")
    processes, bodies = _synthetic_inputs(random.Random(7))
    try:
        # The aggregator has subscribed once the XPUB socket hears its subscription.
        if not pub.poll(30_000):
            raise RuntimeError("the aggregator never subscribed")
        pub.recv()
        for body in processes:
            pub.send_multipart(publisher.encode("process", body))
        sent = bursts = 0
        busy_s = 0.0
        started = time.monotonic()
        cpu0 = cpu_seconds([aggregator.pid])
        while time.monotonic() - started < duration:
            t0 = time.monotonic()
            for i in range(BATCHES_PER_BURST):
                body = bodies[(bursts * BATCHES_PER_BURST + i) % len(bodies)]
                body["time_ns"] = time.time_ns()
                pub.send_multipart(publisher.encode("samples", body))
            sent += BATCHES_PER_BURST * RECORDS_PER_BATCH
            bursts += 1
            # The burst is taken once the aggregator's CPU time (ns, schedstat) stops growing.
            busy_s += _until_idle(aggregator.pid, t0) - t0
            heartbeats.poll(0)
        # Every record counted and every window they opened built: closes are part of the cost.
        deadline = time.monotonic() + 60
        while not (heartbeats.get("samples_received_total") >= sent
                   and heartbeats.get("windows_open") == 0):
            if time.monotonic() > deadline:
                raise RuntimeError("the aggregator did not count and build everything in 60 s")
            heartbeats.poll(500)
        cpu_s = cpu_seconds([aggregator.pid]) - cpu0
        windows = heartbeats.get("windows_closed_total")
        result = {
            "records": sent, "bursts": bursts, "records_per_batch": RECORDS_PER_BATCH,
            "windows_closed": windows,
            "records_per_window": round(sent / windows) if windows else None,
            "busy_s": round(busy_s, 2), "cpu_s": round(cpu_s, 2),
            "records_per_s": round(sent / busy_s) if busy_s else None,
            "records_per_cpu_s": round(sent / cpu_s) if cpu_s else None,
            "profiles_built": heartbeats.get("profiles_built_total"),
            "last_profile_build_s": round(heartbeats.get("profile_build_seconds"), 4),
            "messages_lost": heartbeats.get("messages_lost_total"),
            "peak_rss_mb": status_mb(aggregator.pid, "VmHWM"),
        }
    finally:
        for proc in (aggregator, shipper):
            try:
                stop(proc, 15)
            except AssertionError as e:
                log(str(e))
        ctx.destroy(linger=0)
        shutil.rmtree(base, ignore_errors=True)
    return result


def _until_idle(pid: int, since: float) -> float:
    """When the process last used CPU, once it has used none for IDLE_S."""
    last_cpu, last_busy = cpu_seconds_precise([pid]), since
    deadline = since + 120
    while time.monotonic() < deadline:
        time.sleep(0.005)
        now_cpu = cpu_seconds_precise([pid])
        if now_cpu != last_cpu:
            last_cpu, last_busy = now_cpu, time.monotonic()
        elif time.monotonic() - last_busy > IDLE_S:
            return last_busy
    raise RuntimeError("the aggregator did not take a burst within 120 s")


# --- the window build ---------------------------------------------------------------------------

def window_build() -> dict:
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_window_build.py")],
                         capture_output=True, text=True, timeout=600, cwd=ROOT, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# --- the collector's drain ----------------------------------------------------------------------

def collector_drain(entries: int = 10_000, repeats: int = 5) -> dict:
    from services.collector.bpf_program import KEY, VALUE, CpuSampler

    # The count map is sized by frequency and CPUs (4,096 entries at 100 Hz on 2 CPUs): at
    # 1000 Hz it has 32,768 here, room for the 10,000 entries, as on a host of 16 CPUs.
    sampler = CpuSampler(1000)
    if sampler.counts_max < entries:
        raise RuntimeError(f"the count map holds {sampler.counts_max} entries, not {entries}")
    try:
        counts = sampler.counts
        times, drained = [], []
        for r in range(repeats):
            for i in range(entries):
                # pids far above any real one: the program's own samples add a few entries.
                counts.update(KEY.pack(4_000_000 + i, 4_000_000 + i, 1, i % 16000, -14, 0),
                              VALUE.pack(1 + r))
            t0 = time.perf_counter()
            got = sampler.drain_counts()
            times.append(time.perf_counter() - t0)
            drained.append(len(got))
        per_10k = [t * 10_000 / n for t, n in zip(times, drained) if n]
        return {"entries": entries, "repeats": repeats, "drained_median": median(drained),
                "drain_s_per_10k": round(median(per_10k), 4)}
    finally:
        sampler.close()


def run(args) -> dict:
    log("pipeline: aggregator throughput")
    aggregator = aggregator_throughput(args.duration)
    log("pipeline: window build")
    build = window_build()
    log("pipeline: collector drain")
    try:
        drain = collector_drain()
    except Exception as e:  # BPF unavailable: the other figures still stand
        drain = {"error": str(e)[:300]}
    print(table(["figure", "value"], [
        ["aggregator records/s (while busy)", aggregator["records_per_s"]],
        ["aggregator records per CPU-s", aggregator["records_per_cpu_s"]],
        ["aggregator peak RSS MB", aggregator["peak_rss_mb"]],
        ["window build s (50k stacks x 20, add+close, warm median)", build.get("total_s")],
        ["window build CPU-s", build.get("total_cpu_s")],
        ["collector drain s per 10k entries", drain.get("drain_s_per_10k")],
    ]))
    return {"args": {"duration": args.duration}, "short": args.duration < DEFAULT_DURATION,
            "aggregator": aggregator, "window_build": build, "collector_drain": drain}
