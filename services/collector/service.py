"""The collector's loop: drain the kernel's counts every few seconds (DRAIN_SAMPLES), publish
them with the stacks, kernel names and process metadata on the raw stream, read new processes
as soon as the kernel signals them, and keep the in-kernel filter in step with discovery's
targets."""

from __future__ import annotations

import logging
import math
import os
import time

import zmq

from services import runtime, wire
from services.collector import proc
from services.collector.binary_cache import BinaryCache
from services.collector.bpf_program import (
    PROBLEM_NAMES,
    UNWIND_PROCESSES_MAX,
    UNWOUND_STACK_BASE,
    CpuSampler,
)
from services.collector.build_id import BuildIdCache
from services.collector.exit_watch import raise_fd_limit
from services.collector.kernel_symbols import KernelSymbols
from services.collector.processes import ProcessTable
from services.collector.unwind.loader import UnwindLoader
from services.settings import ENV_PREFIX, Settings

log = logging.getLogger("parca_agent.collector")

# Drains: each one costs about a millisecond of CPU whatever it holds (batch calls that walk
# every bucket of the count and stack maps, the batch's encoding, the aggregator's decoding),
# so the collector drains as rarely as the maps allow: every DRAIN_SAMPLES samples the CPUs
# can take at most (kept well under STACKS_MAX, whose buckets collide more as it fills),
# within [DRAIN_INTERVAL_MIN, DRAIN_INTERVAL_MAX] seconds: 5 s on 2 CPUs at 100 Hz, 1 s from
# 10 CPUs. The interval used is the window split evenly into parts no longer than that, so
# that drains fall on window edges. New processes do not wait for a drain: see NEW_PROCESS_GAP.
DRAIN_SAMPLES = 1024
DRAIN_INTERVAL_MIN = 1.0
DRAIN_INTERVAL_MAX = 5.0
# New processes: the BPF program lists each sampled process the collector has not read in
# new_pids and signals it on a ring buffer whose fd wakes the loop. The loop then reads the
# list (one batch call), reads and publishes those processes and requests their unwind tables,
# so a process is read within milliseconds of its first sample, even if it lives shorter than
# a drain interval, and the loop sleeps while no process is new (it used to read the list
# every second: ~0.2 ms of CPU each time on this VM, mostly for an empty list). At most every
# NEW_PROCESS_GAP seconds, so that a burst of process creation is read in batches.
NEW_PROCESS_GAP = 0.1
# A process whose /proc cannot be read (another user's without CAP_SYS_PTRACE, another pid
# namespace) is marked known anyway, or each of its samples would list it and wake the loop
# again; it leaves known_pids after this long and is tried once more (drains try every sampled
# process they do not know in any case). UNREADABLE_MAX bounds the pids waiting for a retry.
RETRY_UNREADABLE_AFTER = 2.0
UNREADABLE_MAX = 4096
FORGET_EVERY = 30.0
# A subscriber that joins is sent every process's metadata at the next drain, at most this
# often however many join: a peer that keeps subscribing cannot make the collector resend
# everything every second.
ANNOUNCE_EVERY = 2.0
# Kernel-side counters reported as stack_errors_total{kind=...}; -EFAULT on the kernel stack is
# every user-mode sample and on the user stack every kernel thread: expected, reported apart.
STACK_ERROR_KINDS = ("user_stack_collisions", "kernel_stack_collisions", "stack_other_errors")


class Collector:
    def __init__(self, settings: Settings, sampler: CpuSampler, metrics: runtime.Metrics,
                 ctx: zmq.Context | None = None):
        self.settings = settings
        self.sampler = sampler
        self.metrics = metrics
        self.ctx = ctx or zmq.Context.instance()
        runtime.prepare_run_dir(settings.run_dir)
        self.address = wire.endpoint(settings.run_dir, wire.ENDPOINT_COLLECTOR)
        addresses = [self.address]
        if settings.tap_address:
            addresses.append(f"tcp://{_zmq_tcp(settings.tap_address)}")
        # XPUB: a new subscriber (an aggregator that restarted, a tap) is told every process
        # at once, instead of the collector repeating them all on a short timer.
        self.pub = runtime.pub_socket(self.ctx, addresses, subscriptions=True)
        self.targets = runtime.sub_socket(
            self.ctx, [wire.endpoint(settings.run_dir, wire.ENDPOINT_DISCOVERY)],
            [wire.TOPIC_TARGETS])
        self.publisher = wire.Publisher("collector")
        self.heartbeat = runtime.Heartbeat("collector", self.publisher, metrics)
        self.gaps = wire.GapCounter()
        self.bad_log = runtime.RateLimitedLog(log)
        self.kernel = KernelSymbols(os.path.join(settings.proc_path, "kallsyms"))
        binaries = BinaryCache(os.path.join(settings.cache_dir, "binaries"),
                               settings.binary_cache_max_bytes, metrics)
        self.binaries = binaries
        self.processes = ProcessTable(settings.proc_path, BuildIdCache(), binaries, metrics)
        self._newcomers = False  # a subscriber to process metadata joined since the last drain
        self._announced = -ANNOUNCE_EVERY
        self._unreadable: dict[int, float] = {}  # pid -> when to try reading it again
        self._problems = {name: 0 for name in PROBLEM_NAMES}
        # .eh_frame unwinding: tables load in a background thread as processes appear.
        self.unwinder = None
        if getattr(sampler, "unwinding", False):
            # A pidfd per process with tables (UnwindLoader's exit watch), beside the maps,
            # perf events and sockets: supervisord's default of 1,024 would not hold them.
            raise_fd_limit(UNWIND_PROCESSES_MAX + 1024)
            self.unwinder = UnwindLoader(sampler, settings.proc_path, metrics,
                                         store_dir=os.path.join(settings.cache_dir, "unwind"))
            self.unwinder.start()
        self.drain_interval = drain_interval(settings.profiling_duration, os.cpu_count() or 1,
                                             settings.sampling_frequency)
        self._last_drain_ns = time.time_ns()
        self.filtering = False
        self._agent_marker = f"{ENV_PREFIX}RUN_DIR={settings.run_dir}".encode()

    def run(self, stop: runtime.StopFlag) -> None:
        log.info("sampling every CPU at %d Hz; raw stream on %s", self.settings.sampling_frequency,
                 self.address)
        poller = zmq.Poller()
        poller.register(self.targets, zmq.POLLIN)
        poller.register(self.pub, zmq.POLLIN)  # subscriptions
        poller.register(stop.fileno(), zmq.POLLIN)  # SIGTERM wakes the sleep below
        # A process new to the kernel side. Not polled between a wake-up and the tick it
        # schedules: a burst of new processes wakes the loop once per NEW_PROCESS_GAP, not
        # once per process.
        signal = self.sampler.new_process_signal
        poller.register(signal.fileno(), zmq.POLLIN)
        signal_polled = True
        interval = self.drain_interval
        next_drain = _next_boundary(time.time(), interval)
        next_tick = math.inf  # only when there is something to do: a new process, a subscriber
        last_tick = -math.inf
        next_forget = time.monotonic() + FORGET_EVERY
        while not stop.is_set():
            # Sleep until the next drain or tick: targets, subscriptions and new processes
            # wake it too. Drains fall on wall-clock multiples of the interval, which divides
            # the window (windows are wall-clock multiples of their length): a batch then
            # covers time of one window only, and the aggregator places it by its middle.
            wait = min(next_drain - time.time(), interval, next_tick - time.monotonic(),
                       self.heartbeat.next_due - time.monotonic())
            ready = dict(poller.poll(runtime.poll_ms(time.monotonic() + wait)))
            now = time.monotonic()
            if self.targets in ready:
                self._read_targets()
            if self.pub in ready:
                self._read_subscriptions()
                if self._newcomers:
                    next_tick = min(next_tick, max(now, self._announced + ANNOUNCE_EVERY))
            if signal.fileno() in ready:
                # Not cleared here: the tick (or drain) that reads new_pids clears it first,
                # and until then the fd is not polled, or the tick is now.
                next_tick = min(next_tick, max(now, last_tick + NEW_PROCESS_GAP))
                if next_tick > now:
                    poller.unregister(signal.fileno())
                    signal_polled = False
            wall = time.time()
            ticked = True
            if wall >= next_drain or next_drain - wall > interval:  # or the clock moved
                self.drain_once()  # does the tick's work too
                next_drain = _next_boundary(wall, interval)
            elif now >= next_tick:
                self.tick()
            else:
                ticked = False
            if ticked:
                last_tick = now
                if not signal_polled:  # the tick took new_pids: wake on the next one
                    poller.register(signal.fileno(), zmq.POLLIN)
                    signal_polled = True
                # A subscriber still waiting was throttled: announcements are ANNOUNCE_EVERY apart.
                next_tick = self._announced + ANNOUNCE_EVERY if self._newcomers else math.inf
            if self.heartbeat.due():
                self.send_heartbeat()
            if now >= next_forget:
                self.sampler.forget_known(self.processes.forget_idle())
                next_forget = now + FORGET_EVERY
        # Flush what the kernel counted since the last drain before going.
        self.drain_once()

    def _read_targets(self) -> None:
        latest = None
        while (msg := runtime.receive(self.targets, self.metrics, self.gaps, self.bad_log)):
            if msg.type == "targets":
                latest = msg  # only the newest snapshot matters: each one is complete
        if latest is not None:
            self.apply_targets(latest.body)

    def _read_subscriptions(self) -> None:
        topics = runtime.new_subscriptions(self.pub)
        self.metrics.inc("subscriptions_total", len(topics))
        if any(wire.TOPIC_PROCESS.startswith(t) for t in topics):
            self._newcomers = True

    def apply_targets(self, body: dict) -> None:
        try:
            filtering = bool(body["filtering"])
            cgroups, pids = set(), set()
            for target in body["targets"]:
                cgroups.update(int(c) for c in target.get("cgroup_ids", ()))
                pids.update(int(p) for p in target.get("pids", ()))
        except (TypeError, ValueError, KeyError, AttributeError):
            self.metrics.inc("messages_malformed_total", reason="bad_targets")
            return
        self.sampler.set_filter(filtering, cgroups, pids)
        if filtering != self.filtering:
            log.info("in-kernel filter %s", f"on: {len(cgroups)} cgroups, {len(pids)} pids"
                     if filtering else "off: profiling every process")
        self.filtering = filtering
        self.metrics.set("filter_cgroups", len(cgroups) if filtering else 0)
        self.metrics.set("filter_pids", len(pids) if filtering else 0)

    def tick(self) -> None:
        """Between drains: publish the processes the kernel saw for the first time, and
        every process again if a subscriber joined."""
        self._read_new_processes()
        if self._announce_if_joined(time.monotonic()):
            self._republish_due()

    def _read_new_processes(self) -> None:
        now = time.monotonic()
        if self._unreadable and min(self._unreadable.values()) <= now:
            retry = [pid for pid, when in self._unreadable.items() if when <= now]
            for pid in retry:
                del self._unreadable[pid]
            self.sampler.forget_known(retry)  # their next sample lists them again
        # Before the list is taken: a process listed after this signals again.
        self.sampler.new_process_signal.clear()
        pids = self.sampler.take_new_pids()
        if not pids:
            return
        observe = self.processes.observe
        known = self.processes.processes
        for pid, samples in pids.items():
            body = observe(pid, (), now)  # None: known already, or gone before we looked
            if body is not None:
                self._publish_process(body, samples)
        # Every one listed is marked known, or each sample of one that could not be read would
        # list it and wake the loop again; those are forgotten after a while and retried. (One
        # that is gone is not sampled again.)
        for pid in pids:
            if pid not in known and len(self._unreadable) < UNREADABLE_MAX:
                self._unreadable[pid] = now + RETRY_UNREADABLE_AFTER
        self.sampler.mark_known(list(pids))
        self.metrics.inc("new_processes_total", len(pids))

    def _publish_process(self, body: dict, samples: int) -> None:
        """Send a process read for the first time or again (new, remapped or reused), and
        (re)load its tables, unless it is one of the agent's own processes; ``samples`` (its
        samples lately) ranks it in the loader's queue."""
        self._send("process", body)
        maps = self.processes.take_maps(body["pid"])
        if self.unwinder is not None and not self._is_agent(body["pid"]):
            self.unwinder.request(body["pid"], max(1, samples), maps)

    def _announce_if_joined(self, now: float) -> bool:
        """Make every process due for republishing if a subscriber joined (at most every
        ANNOUNCE_EVERY); whether it did."""
        if self._newcomers and now - self._announced >= ANNOUNCE_EVERY:
            self._newcomers = False
            self._announced = now
            self.processes.republish_all_soon()
            return True
        return False

    def _republish_due(self) -> None:
        """Send the processes due: all after a join, else each every REPUBLISH_EVERY. A walk
        over every process: done at drains and after joins, not every tick."""
        for body in self.processes.due_republish():
            self._send("process", body)

    def drain_once(self) -> None:
        started = time.perf_counter()
        entries = self.sampler.drain_counts()
        now_ns = time.time_ns()
        take_stack = self.sampler.take_stack
        stacks: list[list[int]] = []
        # Each stack's id when it is stable across drains (an unwound stack's content hash),
        # else None (the kernel's stack map reuses ids): what ProcessTable remembers as checked.
        stable_ids: list[int | None] = []
        index_of: dict[int, int] = {}  # stack id -> index in stacks, -1 when it was lost
        kernel_indexes: set[int] = set()
        records = []
        user_stacks: dict[int, set[int]] = {}  # pid -> indexes of its user stacks
        samples: dict[int, int] = {}
        lost = total = 0

        def index(stack_id: int) -> int:
            """The stack's index in stacks, taken from the map on its first use; -1: lost."""
            nonlocal lost
            i = index_of.get(stack_id, -2)
            if i == -2:
                addresses = take_stack(stack_id)
                if addresses is None:
                    lost += 1
                    i = -1
                else:
                    i = len(stacks)
                    stacks.append(addresses)
                    stable_ids.append(stack_id if stack_id >= UNWOUND_STACK_BASE else None)
                index_of[stack_id] = i
            return i

        # One pass over the entries: every stack is taken once, however many entries name it.
        for pid, tid, cgroup_id, user_id, kernel_id, count in entries:
            u = index(user_id) if user_id >= 0 else -1
            k = index(kernel_id) if kernel_id >= 0 else -1
            if k >= 0:
                kernel_indexes.add(k)
            records.append([pid, tid, cgroup_id, u, k, count])
            samples[pid] = samples.get(pid, 0) + count
            total += count
            mine = user_stacks.get(pid)
            if mine is None:
                mine = user_stacks[pid] = set()
            if u >= 0:
                mine.add(u)

        kernel_symbols: dict[int, str] = {}
        name = self.kernel.name
        for i in kernel_indexes:
            for address in stacks[i]:
                if address not in kernel_symbols:
                    kernel_symbols[address] = name(address)

        # Metadata first, so a subscriber knows a process before its first samples arrive.
        # Most new processes were read on a tick already (new_pids); this catches the rest
        # (remaps, pid reuse, a full new_pids map) and the ones announced since the last tick.
        self._read_new_processes()
        observe, only_checked = self.processes.observe_stacks, self.processes.only_checked
        now = time.monotonic()
        for pid, indexes in user_stacks.items():
            ids = [stable_ids[i] for i in indexes]
            if only_checked(pid, ids, now):
                continue
            body = observe(pid, list(zip(ids, map(stacks.__getitem__, indexes))), now)
            if body is not None:
                self._publish_process(body, samples.get(pid, 1))
        self._announce_if_joined(time.monotonic())
        self._republish_due()

        problems = self._update_problems(lost)
        if self.unwinder is not None:
            self.unwinder.note_samples(samples)
        if records:
            self._send("samples", {
                "time_ns": now_ns, "duration_ns": now_ns - self._last_drain_ns,
                "frequency": self.settings.sampling_frequency, "records": records,
                "stacks": stacks, "kernel_symbols": kernel_symbols, "errors": problems})
        self._last_drain_ns = now_ns
        m = self.metrics
        if total and not m.get("samples_total"):
            self.heartbeat.soon()  # "sampling" shows in the UI without waiting an interval
        m.inc("samples_total", total)
        m.inc("count_entries_drained_total", len(entries))
        m.inc("stacks_resolved_total", len(stacks))
        m.set("processes_tracked", len(self.processes.processes))
        m.set("drain_seconds", time.perf_counter() - started)

    def _is_agent(self, pid: int) -> bool:
        """One of this agent's processes (they all inherit PARCA_AGENT_RUN_DIR from the
        supervisord that `parca-agent` starts). They are sampled like any other, with frame
        pointers only: their tables would cover grpc, protobuf, ZeroMQ and LLVM (bcc), about
        a second of CPU each the first time a service is sampled, for stacks of the agent."""
        return proc.has_environ_entry(pid, self._agent_marker, self.settings.proc_path)

    def send_heartbeat(self) -> None:
        # The unwinder's kernel counters are read here rather than every drain: they only
        # reach anyone through heartbeats, and reading them is a per-CPU syscall plus a dozen
        # metric updates.
        if self.unwinder is not None:
            self.unwinder.report()
        self.heartbeat.send(self.pub)

    def _update_problems(self, stacks_lost: int) -> dict[str, int]:
        current = self.sampler.read_problems()
        for name, value in current.items():
            delta = value - self._problems.get(name, 0)
            if delta <= 0:
                continue
            if name in STACK_ERROR_KINDS:
                self.metrics.inc("stack_errors_total", delta, kind=name)
            elif name == "count_map_full":
                self.metrics.inc("samples_lost_total", delta, reason="count_map_full")
            else:
                self.metrics.inc(f"bpf_{name}_total", delta)
        self._problems = current
        if stacks_lost:
            self.metrics.inc("stacks_lost_total", stacks_lost)
        report = dict(current)
        report["stacks_lost"] = int(self.metrics.get("stacks_lost_total"))
        return report

    def _send(self, mtype: str, body: dict) -> None:
        runtime.send_nowait(self.pub, self.publisher.encode(mtype, body), self.metrics, "collector")
        self.metrics.inc("messages_published_total", type=mtype)

    def close(self) -> None:
        if self.unwinder is not None:
            self.unwinder.stop()
        self.binaries.stop()
        self.pub.close()
        self.targets.close()
        runtime.unlink_endpoint(self.address)


def drain_interval(window_s: float, cpus: int, frequency: int) -> float:
    """The window split evenly into the fewest parts no longer than the longest interval the
    maps allow on this host (see DRAIN_SAMPLES)."""
    longest = min(DRAIN_INTERVAL_MAX,
                  max(DRAIN_INTERVAL_MIN, DRAIN_SAMPLES / max(1, cpus * frequency)))
    return window_s / max(1, math.ceil(window_s / longest - 1e-9))


def _next_boundary(wall: float, interval: float) -> float:
    """The first wall-clock multiple of ``interval`` after ``wall``."""
    return (math.floor(wall / interval) + 1) * interval


def _zmq_tcp(address: str) -> str:
    from services.settings import parse_host_port

    host, port = parse_host_port(address)
    return f"{host or '*'}:{port}"
