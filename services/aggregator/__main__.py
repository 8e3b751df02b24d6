"""parca-agent-aggregator: builds profiles (``python -m services.aggregator``)."""

from __future__ import annotations

import sys

from services import runtime


def main(argv: list[str] | None = None) -> int:
    settings = runtime.load_settings_or_exit("aggregator", argv)
    log = runtime.setup_logging("aggregator", settings.log_level)
    stop = runtime.StopFlag().install()
    from services.aggregator.service import Aggregator

    aggregator = Aggregator(settings, runtime.Metrics("parca_agent_aggregator"))
    runtime.settle_gc()
    try:
        aggregator.run(stop)
    finally:
        aggregator.close()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
