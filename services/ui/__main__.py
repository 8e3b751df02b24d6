"""``python -m services.ui``: the UI service (``parca-agent-ui``)."""

from __future__ import annotations

import socket
import threading
import time

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
    # No poll interval: the server sleeps until a connection comes (a wake-up a second costs
    # an idle UI more than all its other work); the stop wakes it with a connection of its own.
    http_thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": None},
                                   name="ui-http", daemon=True)
    http_thread.start()
    log.info("listening on %s:%d", *server.server_address[:2])
    while not stop.wait(60.0):  # a signal wakes it at once
        pass
    log.info("stopping")
    _shutdown(server)
    server.server_close()
    feed.join(STOP_WAIT)
    return 1 if feed.failed else 0


def _shutdown(server) -> None:
    """server.shutdown() returns once serve_forever sees the request, which it does only when
    woken: connect to it until it has."""
    stopper = threading.Thread(target=server.shutdown, name="ui-http-stop", daemon=True)
    stopper.start()
    host, port = server.server_address[:2]
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    deadline = time.monotonic() + STOP_WAIT
    while stopper.is_alive() and time.monotonic() < deadline:
        try:
            socket.create_connection((host, port), timeout=0.2).close()
        except OSError:
            pass
        stopper.join(0.1)


if __name__ == "__main__":
    raise SystemExit(main())
