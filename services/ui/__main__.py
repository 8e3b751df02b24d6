"""``python -m services.ui``: the UI service (``parca-agent-ui``)."""

from __future__ import annotations

import threading

from services import runtime
from services.ui.feed import Feed
from services.ui.server import MAX_QUERY_WAIT, App, make_server
from services.ui.state import ServiceHealth, TargetStore

STOP_WAIT = 3.0  # seconds each thread gets to finish after SIGTERM; supervisord waits longer


def main(argv: list[str] | None = None) -> int:
    settings = runtime.load_settings_or_exit("ui", argv)
    log = runtime.setup_logging("ui", settings.log_level)
    stop = runtime.StopFlag().install()
    metrics = runtime.Metrics("parca_agent_ui")
    runtime.prepare_run_dir(settings.run_dir)
    targets, health = TargetStore(), ServiceHealth()
    # /query waits for the next window: one window and a second of slack, as the seed did.
    query_timeout = min(settings.profiling_duration + 1.0, MAX_QUERY_WAIT)
    app = App(targets, health, metrics, query_timeout, stop)
    try:
        server = make_server(settings.http_address, app)
    except OSError as e:
        host, port = settings.http_address
        log.error("cannot listen on %s:%d: %s", host, port, e.strerror)
        return 1
    feed = Feed(settings.run_dir, targets, health, metrics, stop)
    feed.start()
    # The server wakes every poll_interval to see whether shutdown() was called: once a
    # second keeps the idle UI cheap and the stop well within supervisord's wait.
    http_thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 1.0},
                                   name="ui-http", daemon=True)
    http_thread.start()
    log.info("listening on %s:%d", *server.server_address[:2])
    while not stop.wait(60.0):  # a signal wakes it at once
        pass
    log.info("stopping")
    server.shutdown()
    server.server_close()
    feed.join(STOP_WAIT)
    return 1 if feed.failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
