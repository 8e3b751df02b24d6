"""``python -m services.shipper`` / ``parca-agent-shipper``: run the shipper until SIGTERM."""

from __future__ import annotations

import sys

from services import runtime
from services.shipper.service import Shipper


def main(argv: list[str] | None = None) -> int:
    settings = runtime.load_settings_or_exit("shipper", argv)
    log = runtime.setup_logging("shipper", settings.log_level)
    stop = runtime.StopFlag().install()
    metrics = runtime.Metrics("parca_agent_shipper")
    try:
        shipper = Shipper(settings, metrics)
    except OSError as e:
        log.error("cannot use the spool under --cache-dir=%s: %s", settings.cache_dir, e)
        return 1
    shipper.run(stop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
