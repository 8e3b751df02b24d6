"""The UI's HTTP side: pages, static assets, the JSON API, pprof downloads, /query and /metrics.

Anyone who reaches the port may send anything: every handler error becomes a plain-text answer
(never a dead server), handler threads are bounded (beyond the bound a request gets 503 at once),
a slow client times out, and every response carries a strict Content-Security-Policy.
"""

from __future__ import annotations

import json
import logging
import mimetypes
import re
import socket
import threading
import time
from collections import OrderedDict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, urlsplit

from prometheus_client import CONTENT_TYPE_LATEST

from services import runtime
from services.ui import exposition, pages, profiles, selector
from services.ui.state import RANGES, ServiceHealth, Target, TargetStore, Window

STATIC = Path(__file__).parent / "static"
MAX_HANDLERS = 64
REQUEST_TIMEOUT = 30.0  # seconds a client may take to send its request
MAX_QUERY_WAIT = 60.0
# The heavy work (decode, merge, flame graph) runs at most this many at once on a shared machine.
HEAVY_SLOTS = 2
VIEW_CACHE_SIZE = 16

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
}

_TARGET_ID = re.compile(r"^[0-9a-f]{20}$")

log = logging.getLogger("parca_agent.ui")


class HTTPError(Exception):
    """An answer other than 200: plain text, so that nothing in it can run as HTML."""

    def __init__(self, status: int, text: str):
        super().__init__(text)
        self.status = status
        self.text = text


class App:
    """What the handlers share: the stores, the settings they need and a cache of views."""

    def __init__(self, targets: TargetStore, health: ServiceHealth, metrics: runtime.Metrics,
                 query_timeout: float, stop: runtime.StopFlag):
        self.targets = targets
        self.health = health
        self.metrics = metrics
        self.query_timeout = query_timeout
        self.stop = stop
        self.registry = exposition.registry(health)
        self.static = {p.name: p.read_bytes() for p in STATIC.iterdir() if p.is_file()}
        self._heavy = threading.BoundedSemaphore(HEAVY_SLOTS)
        self._views: OrderedDict = OrderedDict()
        self._views_lock = threading.Lock()

    # --- profile data -----------------------------------------------------------------------

    def _windows(self, tid: str, range_name: str) -> tuple[Target, list[Window]]:
        if not _TARGET_ID.match(tid):
            raise HTTPError(404, "no such target: a target id is 20 hex digits")
        if range_name not in RANGES:
            raise HTTPError(400, f"range must be one of {', '.join(RANGES)}")
        found = self.targets.windows_in_range(tid, range_name)
        if found is None:
            raise HTTPError(404, "no such target (it may have expired): see /api/targets")
        return found

    def _decode_merged(self, target: Target, windows: list[Window]):
        decoded = []
        for w in windows:
            try:
                decoded.append(profiles.decode(w.pprof_gz))
            except profiles.ProfileError as e:
                if w is target.latest:
                    self.targets.set_error(target.id, str(e))
                    raise HTTPError(502, f"the latest profile is unusable: {e}") from None
        return profiles.merge(decoded)

    def _heavy_work(self, fn):
        if not self._heavy.acquire(timeout=20):
            raise HTTPError(503, "busy: too many profiles are being prepared; try again")
        try:
            return fn()
        finally:
            self._heavy.release()

    def profile_bytes(self, tid: str, range_name: str, profile_id: str | None) -> bytes:
        target, windows = self._windows(tid, range_name)
        if profile_id is not None:
            windows = [w for w in target.windows if w.profile_id == profile_id]
            if not windows:
                raise HTTPError(404, "that profile is no longer kept; take the latest instead")
        if len(windows) == 1:
            return windows[0].pprof_gz
        return self._heavy_work(lambda: profiles.encode(self._decode_merged(target, windows)))

    def view(self, tid: str, range_name: str) -> dict:
        target, windows = self._windows(tid, range_name)
        key = (tid, range_name, windows[0].profile_id, windows[-1].profile_id, len(windows))
        with self._views_lock:
            cached = self._views.get(key)
            if cached is not None:
                self._views.move_to_end(key)
                return cached

        def build() -> dict:
            v = profiles.view(self._decode_merged(target, windows))
            return {
                "id": tid,
                "labels": target.labels,
                "range": range_name,
                "windows": len(windows),
                "start_time": windows[0].start_ns / 1e9,
                "end_time": windows[-1].end_ns / 1e9,
                "sample_type": v.sample_type,
                "unit": v.unit,
                "total": v.total,
                "download_url": profile_path(tid) + ("" if range_name == "latest"
                                                     else f"?range={range_name}"),
                "flamegraph": v.flamegraph,
                "top": v.top,
            }
        result = self._heavy_work(build)
        with self._views_lock:
            self._views[key] = result
            while len(self._views) > VIEW_CACHE_SIZE:
                self._views.popitem(last=False)
        return result

    # --- JSON ---------------------------------------------------------------------------------

    def targets_json(self) -> dict:
        out = []
        for t in self.targets.targets():
            latest = t.latest
            out.append({
                "id": t.id,
                "labels": t.labels,
                "profile_type": profile_type(t.labels),
                "last_profile_time": latest.end_ns / 1e9 if latest else None,
                "error": t.error,
                "samples": latest.samples if latest else None,
                "profile_url": profile_path(t.id),
                "page_url": page_path(t.id),
                "selector": selector.format_labels(t.labels),
            })
        return {"targets": out, "now": time.time()}

    def services_json(self) -> dict:
        return {"services": [self.health.summary(s) for s in self.health.services()],
                "now": time.time()}


def profile_path(tid: str) -> str:
    return f"/api/profile/{tid}.pb.gz"


def page_path(tid: str) -> str:
    return f"/target/{tid}"


def profile_type(labels: dict[str, str]) -> str:
    return labels.get("__name__") or "parca_agent_cpu"


class Handler(BaseHTTPRequestHandler):
    server_version = "parca-agent-ui"
    sys_version = ""
    timeout = REQUEST_TIMEOUT
    app: App  # set on the subclass the server makes

    # --- plumbing -----------------------------------------------------------------------------

    def version_string(self):
        return self.server_version

    def log_message(self, format, *args):  # noqa: A002 (the base class's name)
        log.debug("%s %s", self.address_string(), format % args)

    def end_headers(self):
        for name, value in SECURITY_HEADERS.items():
            self.send_header(name, value)
        super().end_headers()

    def send_error(self, code, message=None, explain=None):
        """Errors the base class finds (bad request line, too long, bad method), as plain text."""
        self._send(code, f"{code} {message or self.responses.get(code, ('',))[0]}\n".encode(),
                   "text/plain; charset=utf-8")

    def _send(self, status: int, body: bytes, content_type: str,
              extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            try:
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client went away; nothing to answer

    def _json(self, value: dict) -> None:
        self._send(200, json.dumps(value, separators=(",", ":")).encode(),
                   "application/json; charset=utf-8")

    def _html(self, body: bytes, status: int = 200) -> None:
        self._send(status, body, "text/html; charset=utf-8")

    def _pprof(self, body: bytes) -> None:
        self._send(200, body, "application/octet-stream",
                   {"Content-Disposition": 'attachment; filename="profile.pb.gz"'})

    def do_HEAD(self):
        self.do_GET()

    def do_GET(self):
        handler = "unknown"
        status = 200
        try:
            url = urlsplit(self.path)
            params = {k: v[-1] for k, v in parse_qs(url.query, max_num_fields=20).items()}
            handler, fn, arg = self._route(url.path)
            fn(arg, params)
        except HTTPError as e:
            status = e.status
            self._send(e.status, f"{e.status} {e.text}\n".encode(), "text/plain; charset=utf-8")
        except ValueError as e:  # parse_qs refuses too many fields
            status = 400
            self._send(400, f"400 bad request: {e}\n".encode(), "text/plain; charset=utf-8")
        except Exception:
            status = 500
            log.exception("%s %s failed", self.command, handler)
            self._send(500, b"500 internal error (logged)\n", "text/plain; charset=utf-8")
        self.app.metrics.inc("http_requests_total", handler=handler, code=str(status))

    def _route(self, path: str):
        routes = (
            ("index", r"/", self.index),
            ("healthz", r"/healthz", self.healthz),
            ("metrics", r"/metrics", self.metrics),
            ("static", r"/static/([A-Za-z0-9._-]+)", self.static),
            ("favicon", r"/favicon\.ico", self.favicon),
            ("target", r"/target/([^/]+)", self.target_page),
            ("api_targets", r"/api/targets", self.api_targets),
            ("api_services", r"/api/services", self.api_services),
            ("api_flamegraph", r"/api/flamegraph/([^/]+)", self.api_flamegraph),
            ("api_profile", r"/api/profile/([^/]+)\.pb\.gz", self.api_profile),
            ("query", r"/query", self.query),
        )
        for name, pattern, fn in routes:
            m = re.fullmatch(pattern, path)
            if m:
                return name, fn, (m.group(1) if m.groups() else None)
        raise HTTPError(404, "not found")

    # --- pages --------------------------------------------------------------------------------

    def index(self, _arg, _params):
        self._html(pages.render("index", "Profilers"))

    def healthz(self, _arg, _params):
        self._send(200, b"ok\n", "text/plain; charset=utf-8")

    def metrics(self, _arg, _params):
        self.app.health.refresh_metrics("ui", self.app.metrics.snapshot())
        self._send(200, exposition.render(self.app.registry), CONTENT_TYPE_LATEST)

    def static(self, name, _params):
        body = self.app.static.get(name)
        if body is None:
            raise HTTPError(404, "no such asset")
        ctype = mimetypes.guess_type(name)[0] or "text/plain"
        if ctype.startswith("text/") or ctype.endswith("javascript"):
            ctype += "; charset=utf-8"
        self._send(200, body, ctype)

    def favicon(self, _arg, params):
        self.static("favicon.svg", params)

    def target_page(self, tid, _params):
        target = self.app.targets.get(tid) if _TARGET_ID.match(tid) else None
        if target is None:
            body = pages.render("message", "No such target", heading="No such target",
                                text="This target has no recent profile (it may have expired).")
            return self._html(body, 404)
        self._html(pages.render(
            "target", profile_type(target.labels), target_id=tid,
            profile_type=profile_type(target.labels), labels=pages.label_chips(target.labels),
            download_url=profile_path(tid)))

    # --- API ----------------------------------------------------------------------------------

    def api_targets(self, _arg, _params):
        self._json(self.app.targets_json())

    def api_services(self, _arg, _params):
        self._json(self.app.services_json())

    def api_flamegraph(self, tid, params):
        self._json(self.app.view(tid, params.get("range", "latest")))

    def api_profile(self, tid, params):
        # `go tool pprof` may add ?seconds=N (with its -seconds flag); a stored profile ignores it.
        self._pprof(self.app.profile_bytes(tid, params.get("range", "latest"),
                                           params.get("profile_id")))

    def query(self, _arg, params):
        text = params.get("query")
        if not text:
            raise HTTPError(400, 'missing query: give /query?query={label="value"}')
        try:
            sel = selector.parse(text)
        except selector.SelectorError as e:
            raise HTTPError(400, f"bad selector: {e}") from None
        found = self.app.targets.wait_next(sel.matches, self.app.query_timeout, self.app.stop)
        if found is None:
            raise HTTPError(404, f"no profile matched the selector within "
                                 f"{self.app.query_timeout:g} s")
        target, window = found
        download = f"{profile_path(target.id)}?profile_id={quote(window.profile_id, safe='')}"
        if params.get("debug") not in (None, "", "0", "false"):
            start = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(window.start_ns / 1e9))
            self._html(pages.render(
                "query", "Query", selector=text, labels=pages.label_chips(target.labels),
                window=f"{start}, {(window.end_ns - window.start_ns) / 1e9:g} s",
                samples=window.samples, download_url=download, page_url=page_path(target.id)))
        else:
            self._pprof(window.pprof_gz)


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64

    def __init__(self, address: tuple[str, int], app: App, family: int = socket.AF_INET):
        self.address_family = family
        self._slots = threading.BoundedSemaphore(MAX_HANDLERS)
        super().__init__(address, type("BoundHandler", (Handler,), {"app": app}))

    def server_bind(self):
        if self.address_family == socket.AF_INET6 and self.server_address[0] == "::":
            # Dual stack: "::" also takes IPv4, like Go's ":8080".
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()

    def process_request(self, request, client_address):
        if not self._slots.acquire(blocking=False):
            try:
                request.sendall(b"HTTP/1.0 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")
            except OSError:
                pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


def make_server(address: tuple[str, int], app: App) -> Server:
    """Listen on host:port; an empty host means every interface, IPv6 too where the host has it."""
    host, port = address
    if host == "":
        try:
            return Server(("::", port), app, socket.AF_INET6)
        except OSError:
            return Server(("0.0.0.0", port), app)
    return Server((host, port), app, socket.AF_INET6 if ":" in host else socket.AF_INET)
