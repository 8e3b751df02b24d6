"""parca-agent-collector: the privileged sampler (``python -m services.collector``)."""

from __future__ import annotations

import sys

from services import runtime


def main(argv: list[str] | None = None) -> int:
    settings = runtime.load_settings_or_exit("collector", argv)
    log = runtime.setup_logging("collector", settings.log_level)
    stop = runtime.StopFlag().install()
    from services.collector.bpf_program import BpfUnavailable, CpuSampler
    from services.collector.service import Collector

    try:
        sampler = CpuSampler(settings.sampling_frequency, unwind=settings.dwarf_unwind)
    except BpfUnavailable as e:
        print(f"parca-agent-collector: {e}", file=sys.stderr)
        return 1
    metrics = runtime.Metrics("parca_agent_collector")
    collector = None
    try:
        collector = Collector(settings, sampler, metrics)
        runtime.settle_gc()  # the kallsyms table and modules stay out of later collections
        collector.run(stop)
    finally:
        if collector is not None:
            collector.close()
        sampler.close()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
