"""``python -m services.discovery`` / ``parca-agent-discovery``."""

from __future__ import annotations

from services import runtime
from services.discovery import service


def main(argv: list[str] | None = None) -> int:
    settings = runtime.load_settings_or_exit("discovery", argv)
    log = runtime.setup_logging("discovery", settings.log_level)
    stop = runtime.StopFlag().install()
    metrics = runtime.Metrics("parca_agent_discovery")
    service.run(settings, stop, log, metrics)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
