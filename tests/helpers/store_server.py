"""The far side of the shipper for the tests.

``FakeStore``: a real gRPC store built from the project's .proto files (Parca's
ProfileStoreService/WriteRaw, Conprof's WritableProfileStore/Write, Parca's DebuginfoService); it
records what arrives with each call's metadata and can be told to fail with a status code.
``make_pprof``/``profile_body``: profiles to send. ``ShipperThread``: the shipper service running
in a thread of the test with short intervals."""

from __future__ import annotations

import gzip
import os
import threading
import time
import uuid
from concurrent import futures
from dataclasses import dataclass, field

import grpc

import services.proto_gen  # noqa: F401  (puts the generated packages on sys.path)
from conprof import store_pb2, store_pb2_grpc
from parca.debuginfo.v1alpha1 import debuginfo_pb2, debuginfo_pb2_grpc
from parca.profilestore.v1alpha1 import profilestore_pb2, profilestore_pb2_grpc
from pprof import profile_pb2
from services import runtime, settings
from services.profile_channel import ProfileSender
from services.shipper.service import Shipper
from services.shipper.store_client import Backoff


@dataclass
class Received:
    """Everything the store was sent, in arrival order."""

    parca: list = field(default_factory=list)  # WriteRawRequest
    conprof: list = field(default_factory=list)  # conprof WriteRequest
    authorization: list = field(default_factory=list)  # the authorization header of each call
    should_initiate: list = field(default_factory=list)  # build ids asked about
    uploads: dict = field(default_factory=dict)  # build id -> list of uploaded byte strings
    finished: list = field(default_factory=list)  # build ids marked finished


class FakeStore:
    """Start with ``start()``; ``fail_with`` makes every write answer that status code."""

    def __init__(self, tls: tuple[bytes, bytes] | None = None, port: int = 0):
        self.tls = tls  # (certificate chain PEM, private key PEM)
        self.port = port
        self.received = Received()
        self.fail_with: grpc.StatusCode | None = None
        self.lock = threading.Lock()
        self._server: grpc.Server | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> "FakeStore":
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        profilestore_pb2_grpc.add_ProfileStoreServiceServicer_to_server(_Parca(self), server)
        store_pb2_grpc.add_WritableProfileStoreServicer_to_server(_Conprof(self), server)
        debuginfo_pb2_grpc.add_DebuginfoServiceServicer_to_server(_Debuginfo(self), server)
        where = f"127.0.0.1:{self.port}"
        if self.tls:
            creds = grpc.ssl_server_credentials([(self.tls[1], self.tls[0])])
            self.port = server.add_secure_port(where, creds)
        else:
            self.port = server.add_insecure_port(where)
        server.start()
        self._server = server
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=0).wait()
            self._server = None

    def raw_profiles(self) -> list[tuple[dict[str, str], bytes]]:
        """(labels, raw_profile) of every sample WriteRaw received."""
        with self.lock:
            requests = list(self.received.parca)
        out = []
        for request in requests:
            for series in request.series:
                labels = {label.name: label.value for label in series.labels.labels}
                out.extend((labels, sample.raw_profile) for sample in series.samples)
        return out

    def _record_call(self, context) -> bool:
        """Record the call's token; False when the call was answered with an injected failure."""
        metadata = dict(context.invocation_metadata())
        with self.lock:
            self.received.authorization.append(metadata.get("authorization", ""))
        if self.fail_with is not None:
            context.abort(self.fail_with, f"test store answers {self.fail_with.name}")
        return True


class _Parca(profilestore_pb2_grpc.ProfileStoreServiceServicer):
    def __init__(self, store: FakeStore):
        self.store = store

    def WriteRaw(self, request, context):
        self.store._record_call(context)
        with self.store.lock:
            self.store.received.parca.append(request)
        return profilestore_pb2.WriteRawResponse()


class _Conprof(store_pb2_grpc.WritableProfileStoreServicer):
    def __init__(self, store: FakeStore):
        self.store = store

    def Write(self, request, context):
        self.store._record_call(context)
        with self.store.lock:
            self.store.received.conprof.append(request)
        return store_pb2.WriteResponse()


class _Debuginfo(debuginfo_pb2_grpc.DebuginfoServiceServicer):
    """Wants every build id it has not received yet, through the gRPC upload strategy."""

    def __init__(self, store: FakeStore):
        self.store = store

    def ShouldInitiateUpload(self, request, context):
        with self.store.lock:
            self.store.received.should_initiate.append(request.build_id)
            have = request.build_id in self.store.received.uploads
        return debuginfo_pb2.ShouldInitiateUploadResponse(
            should_initiate_upload=not have, reason="already uploaded" if have else "new")

    def InitiateUpload(self, request, context):
        instructions = debuginfo_pb2.UploadInstructions(
            build_id=request.build_id, upload_id=str(uuid.uuid4()), type=request.type,
            upload_strategy=debuginfo_pb2.UploadInstructions.UPLOAD_STRATEGY_GRPC)
        return debuginfo_pb2.InitiateUploadResponse(upload_instructions=instructions)

    def Upload(self, request_iterator, context):
        info, chunks = None, []
        for request in request_iterator:
            if request.WhichOneof("data") == "info":
                info = request.info
            else:
                chunks.append(request.chunk_data)
        if info is None:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "upload without info")
        data = b"".join(chunks)
        with self.store.lock:
            self.store.received.uploads.setdefault(info.build_id, []).append(data)
        return debuginfo_pb2.UploadResponse(build_id=info.build_id, size=len(data))

    def MarkUploadFinished(self, request, context):
        with self.store.lock:
            self.store.received.finished.append(request.build_id)
        return debuginfo_pb2.MarkUploadFinishedResponse()


# -- profiles and a shipper to send them through ---------------------------------------------------

def make_pprof(time_nanos: int, build_id: str = "", filename: str = "/usr/bin/workload") -> bytes:
    """A small gzipped pprof CPU profile (main -> work) with one file mapping."""
    strings = ["", "cpu", "nanoseconds", "samples", "count", "main", "work", filename, build_id]
    index = {s: i for i, s in enumerate(strings)}
    profile = profile_pb2.Profile(string_table=strings, time_nanos=time_nanos,
                                  duration_nanos=10_000_000_000, period=10_000_000)
    profile.sample_type.add(type=index["samples"], unit=index["count"])
    profile.sample_type.add(type=index["cpu"], unit=index["nanoseconds"])
    profile.period_type.type, profile.period_type.unit = index["cpu"], index["nanoseconds"]
    profile.mapping.add(id=1, memory_start=0x400000, memory_limit=0x500000,
                        filename=index[filename], build_id=index[build_id])
    for fid, name in ((1, "main"), (2, "work")):
        profile.function.add(id=fid, name=index[name], system_name=index[name])
        location = profile.location.add(id=fid, mapping_id=1, address=0x401000 + fid * 0x10)
        location.line.add(function_id=fid, line=10 * fid)
    profile.sample.add(location_id=[2, 1], value=[7, 70_000_000])
    return gzip.compress(profile.SerializeToString())


def profile_body(n: int, labels: dict[str, str] | None = None, build_id: str = "",
                 filename: str = "/usr/bin/workload") -> dict:
    """A wire ``profile`` body: window n of a test target; its pprof bytes are unique to n."""
    start_ns = 1_700_000_000_000_000_000 + n * 10_000_000_000
    end_ns = start_ns + 10_000_000_000
    return {"id": f"profile-{n}", "labels": labels or {"node": "test-node", "pid": "42"},
            "start_ns": start_ns, "end_ns": end_ns,
            "pprof": make_pprof(start_ns, build_id, filename), "samples": 7}


class ShipperThread:
    """The shipper service in a thread of the test, with short intervals, on tmp directories."""

    def __init__(self, root, store_address: str = "", env: dict[str, str] | None = None,
                 **shipper_kwargs):
        environ = {"PARCA_AGENT_RUN_DIR": os.path.join(str(root), "run"),
                   "PARCA_AGENT_CACHE_DIR": os.path.join(str(root), "cache"),
                   "PARCA_AGENT_STORE_ADDRESS": store_address,
                   "PARCA_AGENT_NODE": "test-node", **(env or {})}
        self.settings = settings.resolve(None, environ)
        self.metrics = runtime.Metrics("parca_agent_shipper")
        kwargs = {"interval": 0.1, "backoff": Backoff(0.05, 0.5),
                  "max_reconnect_backoff_ms": 300, **shipper_kwargs}
        self.shipper = Shipper(self.settings, self.metrics, **kwargs)
        self.stop = runtime.StopFlag()
        self.thread = threading.Thread(target=self.shipper.run, args=(self.stop,), daemon=True)

    def __enter__(self) -> "ShipperThread":
        self.thread.start()
        sock_path = os.path.join(self.settings.run_dir, "shipper.sock")
        wait_until(lambda: os.path.exists(sock_path), 10)
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(5)
        assert not self.thread.is_alive(), "shipper did not stop within 5 s"

    def metric(self, name: str, **labels: str) -> float:
        return self.metrics.get(name, **labels)

    def sender(self, **kwargs):
        return ProfileSender(self.settings.run_dir, **{"resend_after": 0.5, **kwargs})


def wait_until(predicate, timeout: float = 20.0, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return bool(predicate())


def send_acked(sender, bodies: list[dict], timeout: float = 20.0) -> None:
    """Send the profiles and poll until the shipper acknowledged every one."""
    for body in bodies:
        sender.send(body)

    def all_acked() -> bool:
        sender.poll()
        return sender.pending() == 0

    assert wait_until(all_acked, timeout), f"{sender.pending()} profiles not acknowledged"
