"""A stand-in for the Kubernetes API server, for tests: it is NOT Kubernetes.

It serves only ``GET /api/v1/pods``, the pod list and watch that discovery uses, in the API's
JSON: a ``PodList`` with ``metadata.resourceVersion``; with ``watch=true`` a chunked stream of
``{"type": ..., "object": ...}`` lines from the given ``resourceVersion`` on (an ``ERROR`` event
with code 410 when that version is older than the kept history), ending after
``timeoutSeconds``. ``fieldSelector`` understands ``spec.nodeName=<node>``; ``labelSelector``
understands ``k=v``, ``k==v``, ``k!=v``, ``k``, ``!k`` joined by commas (unlike the real server,
a pod changed so that it leaves the selection is not sent as DELETED). The real `kubernetes`
client talks to it through the kubeconfig ``write_kubeconfig`` makes.
"""

from __future__ import annotations

import copy
import json
import socket
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse


def make_pod(name: str, node: str, containers: dict[str, str], namespace: str = "default",
             labels: dict[str, str] | None = None, runtime: str = "containerd") -> dict:
    """A running pod; ``containers`` maps container name to its 64-hex id."""
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "uid": str(uuid.uuid4()),
                     "labels": dict(labels or {})},
        "spec": {"nodeName": node,
                 "containers": [{"name": c, "image": "example/app:1"} for c in containers]},
        "status": {"phase": "Running", "containerStatuses": [
            {"name": c, "containerID": f"{runtime}://{cid}", "ready": True, "restartCount": 0,
             "image": "example/app:1", "imageID": "sha256:" + "0" * 64,
             "state": {"running": {"startedAt": "2024-01-01T00:00:00Z"}}}
            for c, cid in containers.items()]},
    }


def write_kubeconfig(path, server_url: str) -> str:
    """A kubeconfig for ``server_url`` (JSON is YAML, so the client's YAML loader reads it)."""
    config = {
        "apiVersion": "v1", "kind": "Config", "current-context": "stand-in",
        "clusters": [{"name": "stand-in", "cluster": {"server": server_url}}],
        "users": [{"name": "stand-in", "user": {"token": "not-a-secret"}}],
        "contexts": [{"name": "stand-in", "context": {"cluster": "stand-in", "user": "stand-in"}}],
    }
    with open(path, "w") as fh:
        json.dump(config, fh)
    return str(path)


def _label_matches(selector: str, labels: dict[str, str]) -> bool:
    for term in (t.strip() for t in selector.split(",") if t.strip()):
        if "!=" in term:
            key, value = (s.strip() for s in term.split("!=", 1))
            if labels.get(key) == value:
                return False
        elif "=" in term:
            key, value = (s.strip() for s in term.replace("==", "=").split("=", 1))
            if labels.get(key) != value:
                return False
        elif term.startswith("!"):
            if term[1:].strip() in labels:
                return False
        elif term not in labels:
            return False
    return True


def _field_matches(selector: str, pod: dict) -> bool:
    for term in (t.strip() for t in selector.split(",") if t.strip()):
        key, _, value = term.partition("=")
        if key == "spec.nodeName" and pod.get("spec", {}).get("nodeName") != value:
            return False
    return True


class FakeKubeAPI:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._pods: dict[str, dict] = {}  # by "namespace/name"
        self._events: list[tuple[int, str, dict]] = []  # (resourceVersion, type, pod)
        self._expired_through = -1  # watches from this resourceVersion or older get 410 Gone
        self._version = 1000
        self._break_generation = 0
        self._clean_end = False
        self.list_requests = 0
        self.watch_requests = 0
        self.active_watches = 0
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    # --- the test's side ---

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "FakeKubeAPI":
        self._thread.start()
        return self

    def stop(self) -> None:
        self.break_watches()
        self._server.shutdown()
        self._server.server_close()

    def write_kubeconfig(self, path) -> str:
        return write_kubeconfig(path, self.url)

    def put_pod(self, pod: dict) -> None:
        """Add a pod or replace it (ADDED or MODIFIED to watchers)."""
        key = f"{pod['metadata']['namespace']}/{pod['metadata']['name']}"
        with self._cond:
            kind = "MODIFIED" if key in self._pods else "ADDED"
            self._record(kind, key, copy.deepcopy(pod))

    def delete_pod(self, namespace: str, name: str) -> None:
        key = f"{namespace}/{name}"
        with self._cond:
            self._record("DELETED", key, self._pods[key])

    def break_watches(self) -> None:
        """Cut every open watch stream without its closing chunk, like a dying connection."""
        self._end_watches(clean=False)

    def end_watches(self) -> None:
        """End every open watch stream properly, as a server does at its watch timeout."""
        self._end_watches(clean=True)

    def _end_watches(self, clean: bool) -> None:
        with self._cond:
            self._break_generation += 1
            self._clean_end = clean
            self._cond.notify_all()

    def forget_history(self) -> None:
        """Drop the event history: a watch from any resourceVersion given out so far gets
        410 Gone, as after the API server compacted its store."""
        with self._cond:
            self._events.clear()
            self._expired_through = self._version

    def wait_for_watches(self, count: int, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.watch_requests < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def _record(self, kind: str, key: str, pod: dict) -> None:
        self._version += 1
        pod = copy.deepcopy(pod)
        pod["metadata"]["resourceVersion"] = str(self._version)
        if kind == "DELETED":
            self._pods.pop(key, None)
        else:
            self._pods[key] = pod
        self._events.append((self._version, kind, pod))
        self._cond.notify_all()

    # --- the server's side ---

    def _handler_class(self):
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet test output
                pass

            def do_GET(self):
                url = urlparse(self.path)
                if url.path != "/api/v1/pods":
                    self._json(404, {"kind": "Status", "status": "Failure", "code": 404,
                                     "reason": "NotFound", "message": url.path})
                    return
                query = {k: v[-1] for k, v in parse_qs(url.query).items()}
                fields = query.get("fieldSelector", "")
                labels = query.get("labelSelector", "")

                def wanted(pod):
                    return (_field_matches(fields, pod)
                            and _label_matches(labels, pod["metadata"].get("labels") or {}))

                if query.get("watch") in ("true", "1"):
                    api._serve_watch(self, wanted, int(query.get("resourceVersion") or 0),
                                     float(query.get("timeoutSeconds") or 60))
                else:
                    with api._cond:
                        api.list_requests += 1
                        items = [p for p in api._pods.values() if wanted(p)]
                        version = str(api._version)
                    self._json(200, {"kind": "PodList", "apiVersion": "v1",
                                     "metadata": {"resourceVersion": version}, "items": items})

            def _json(self, code, body):
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler

    def _serve_watch(self, handler, wanted, since: int, timeout: float) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()

        def chunk(event: dict) -> None:
            data = (json.dumps(event) + "\n").encode()
            handler.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            handler.wfile.flush()

        deadline = time.monotonic() + timeout
        with self._cond:
            self.watch_requests += 1
            self.active_watches += 1
            generation = self._break_generation
            self._cond.notify_all()
        try:
            with self._cond:
                gone = since <= self._expired_through
            if gone:
                chunk({"type": "ERROR", "object": {
                    "kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 410,
                    "reason": "Expired", "message": f"too old resource version: {since}"}})
                handler.wfile.write(b"0\r\n\r\n")
                return
            sent = since
            while True:
                with self._cond:
                    pending = [e for e in self._events if e[0] > sent]
                    if not pending:
                        left = deadline - time.monotonic()
                        if left <= 0 or self._break_generation != generation:
                            broken = (self._break_generation != generation
                                      and not self._clean_end)
                            break
                        self._cond.wait(min(left, 0.5))
                        continue
                for version, kind, pod in pending:
                    sent = version
                    if wanted(pod):
                        chunk({"type": kind, "object": pod})
            if broken:
                # No closing chunk: the client sees the connection die mid-stream.
                handler.connection.shutdown(socket.SHUT_RDWR)
                handler.close_connection = True
            else:
                handler.wfile.write(b"0\r\n\r\n")
        except OSError:
            pass  # the client went away
        finally:
            with self._cond:
                self.active_watches -= 1
