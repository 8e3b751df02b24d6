"""Clients of the store: Parca's ProfileStoreService/WriteRaw and Conprof's
WritableProfileStore/Write, over one channel that the debuginfo uploader shares.

Transport, as a user of the Go agent expects it:

- TLS by default, verified against the system's roots. A private CA: point gRPC's
  ``GRPC_DEFAULT_SSL_ROOTS_FILE_PATH`` at its PEM file (gRPC reads it for its default roots).
- ``--insecure``: plaintext.
- ``--insecure-skip-verify``: gRPC for Python cannot switch certificate verification off, so the
  shipper fetches the certificate the store presents (``ssl.get_server_certificate``) and pins it
  as the only root, with the TLS name checked against a name taken from that certificate. The
  connection stays encrypted and accepts whatever certificate the store shows at connect time
  (which is what skip-verify means); when the store's certificate changes, a failed handshake
  makes the shipper fetch and pin it again.
- ``authorization: Bearer <token>`` on every call, the token from ``--bearer-token`` or
  ``--bearer-token-file`` (re-read when the file changes, as rotated tokens are). The token is
  never logged.
- A deadline on every call.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import ssl
import threading
from dataclasses import dataclass

import grpc

import services.proto_gen  # noqa: F401  (puts the generated packages on sys.path)
from conprof import store_pb2, store_pb2_grpc
from parca.profilestore.v1alpha1 import profilestore_pb2, profilestore_pb2_grpc
from services import runtime

log = logging.getLogger("parca_agent.shipper")

CALL_TIMEOUT = 10.0  # seconds per write: a batch is a few MB at most
PROFILE_NAME = "parca_agent_cpu"  # the series' __name__, as Parca Agent names CPU profiles
# Answers that will not change by asking again: the batch is dropped, not retried forever.
PERMANENT_CODES = frozenset({
    grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.ALREADY_EXISTS,
})
_HINTS = {
    grpc.StatusCode.UNAUTHENTICATED: "check --bearer-token or --bearer-token-file",
    grpc.StatusCode.PERMISSION_DENIED: "the token is not allowed to write to this store",
    grpc.StatusCode.UNIMPLEMENTED: "the store does not offer this API: check --store-protocol",
}


class StoreError(Exception):
    """A failed call: ``retryable`` says whether asking again later can succeed."""

    def __init__(self, code: str, message: str, retryable: bool, tls_failure: bool = False):
        super().__init__(message)
        self.code = code
        self.retryable = retryable
        self.tls_failure = tls_failure


def store_error(e: grpc.RpcError, address: str) -> StoreError:
    code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
    details = (e.details() if hasattr(e, "details") else "") or ""
    if "CERTIFICATE_VERIFY_FAILED" in details or "andshake failed" in details:
        return StoreError(
            "TLS", f"TLS handshake with the store at {address} failed: its certificate is not "
                   f"trusted ({_short(details)}). Give the store a certificate from a CA in the "
                   f"system's roots, point GRPC_DEFAULT_SSL_ROOTS_FILE_PATH at your CA's PEM, or "
                   f"use --insecure-skip-verify", retryable=True, tls_failure=True)
    hint = _HINTS.get(code)
    text = f"store at {address} answered {code.name}: {_short(details)}"
    return StoreError(code.name, f"{text} ({hint})" if hint else text,
                      retryable=code not in PERMANENT_CODES)


def _short(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


class BearerToken:
    """The token to send: a fixed one, or the content of a file, re-read when it changes."""

    def __init__(self, token: str = "", path: str = ""):
        self._token = token.strip()
        self._path = path
        self._file_key: tuple[int, int, int] | None = None
        self._lock = threading.Lock()
        self._warn = runtime.RateLimitedLog(log, interval=60.0)

    def value(self) -> str:
        if not self._path:
            return self._token
        with self._lock:
            try:
                st = os.stat(self._path)
                key = (st.st_mtime_ns, st.st_size, st.st_ino)
                if key != self._file_key:
                    with open(self._path, encoding="utf-8") as fh:
                        self._token = fh.read().strip()
                    self._file_key = key
            except (OSError, UnicodeDecodeError) as e:
                # Keep the last token: a rotation that briefly removes the file is not an outage.
                self._warn.warning("token_file", f"cannot read the bearer token file "
                                                 f"{self._path}: {e}")
            return self._token

    def __repr__(self) -> str:
        return f"BearerToken(path={self._path!r})"  # never the token itself


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]") or "localhost", int(port)


def pin_server_certificate(address: str, timeout: float) -> tuple[bytes, str]:
    """The certificate the store presents (PEM) and a name in it for the TLS name check."""
    host, port = split_address(address)
    pem = ssl.get_server_certificate((host, port), timeout=timeout)
    # Verify against the fetched certificate itself to have ssl decode it; partial chains let a
    # leaf signed by an unknown CA be its own anchor, as gRPC's BoringSSL accepts it.
    context = ssl.create_default_context(cadata=pem)
    context.check_hostname = False
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    with socket.create_connection((host, port), timeout=timeout) as raw:
        with context.wrap_socket(raw, server_hostname=host) as tls:
            cert = tls.getpeercert() or {}
    names = [value for kind, value in cert.get("subjectAltName", ()) if kind == "DNS"]
    names += [value for kind, value in cert.get("subjectAltName", ()) if kind == "IP Address"]
    names += [value for rdn in cert.get("subject", ()) for key, value in rdn if key == "commonName"]
    name = names[0] if names else host
    if name.startswith("*."):
        name = "skip-verify" + name[1:]  # any name a wildcard covers
    return pem.encode(), name


@dataclass
class Transport:
    """How to reach the store: the settings that shape the channel."""

    address: str
    insecure: bool = False
    insecure_skip_verify: bool = False
    root_certificates: bytes | None = None  # None: the system's roots (or gRPC's env override)
    timeout: float = CALL_TIMEOUT
    # gRPC's own reconnect backoff reaches two minutes; ours is what paces retries, so keep the
    # channel's short to notice a returning store quickly.
    max_reconnect_backoff_ms: int = 5000


class StoreConnection:
    """One channel to the store, made on first use, with the bearer token and a deadline on
    every call. Thread-safe: the sending thread and the debuginfo uploads share it."""

    def __init__(self, transport: Transport, token: BearerToken):
        self.transport = transport
        self.token = token
        self._channel: grpc.Channel | None = None
        self._stubs: dict[type, object] = {}
        self._lock = threading.Lock()
        self._closed = False

    def stub(self, stub_class):
        with self._lock:
            if self._closed:
                raise StoreError("CANCELLED", "shipper is stopping", retryable=True)
            if self._channel is None:
                self._channel = self._make_channel()
                self._stubs = {}
            if stub_class not in self._stubs:
                self._stubs[stub_class] = stub_class(self._channel)
            return self._stubs[stub_class]

    def metadata(self) -> tuple[tuple[str, str], ...]:
        token = self.token.value()
        return (("authorization", f"Bearer {token}"),) if token else ()

    def call(self, stub_class, method: str, request, timeout: float | None = None):
        """A unary or client-streaming call; StoreError on failure."""
        try:
            rpc = getattr(self.stub(stub_class), method)
            return rpc(request, timeout=timeout or self.transport.timeout,
                       metadata=self.metadata())
        except grpc.RpcError as e:
            error = store_error(e, self.transport.address)
            if error.tls_failure and self.transport.insecure_skip_verify:
                self._forget_channel()  # the store's certificate changed: pin the new one
            raise error from None

    def close(self) -> None:
        """Close the channel; calls in flight end at once with CANCELLED."""
        with self._lock:
            self._closed = True
            if self._channel is not None:
                self._channel.close()
                self._channel = None

    def _forget_channel(self) -> None:
        with self._lock:
            if self._channel is not None:
                self._channel.close()
            self._channel = None

    def _make_channel(self) -> grpc.Channel:
        t = self.transport
        options = [("grpc.max_reconnect_backoff_ms", t.max_reconnect_backoff_ms),
                   ("grpc.initial_reconnect_backoff_ms", min(1000, t.max_reconnect_backoff_ms)),
                   ("grpc.min_reconnect_backoff_ms", min(1000, t.max_reconnect_backoff_ms)),
                   ("grpc.max_send_message_length", -1)]
        if t.insecure:
            return grpc.insecure_channel(t.address, options=options)
        roots = t.root_certificates
        if t.insecure_skip_verify:
            try:
                roots, name = pin_server_certificate(t.address, t.timeout)
            except (OSError, ValueError) as e:
                raise StoreError("UNAVAILABLE", f"cannot fetch the certificate of the store at "
                                                f"{t.address} for --insecure-skip-verify: {e}",
                                 retryable=True) from None
            options.append(("grpc.ssl_target_name_override", name))
        credentials = grpc.ssl_channel_credentials(root_certificates=roots)
        return grpc.secure_channel(t.address, credentials, options=options)


def series_labels(labels: dict[str, str]) -> list[tuple[str, str]]:
    """A profile's series labels: the target's, plus __name__, sorted by name."""
    merged = dict(labels)
    merged["__name__"] = PROFILE_NAME
    return sorted(merged.items())


def group_by_series(profiles: list[dict]) -> list[tuple[list[tuple[str, str]], list[dict]]]:
    """Profiles of the same target (label set) go into one series, oldest first."""
    groups: dict[tuple[tuple[str, str], ...], list[dict]] = {}
    for body in profiles:
        groups.setdefault(tuple(series_labels(body["labels"])), []).append(body)
    return [(list(labels), bodies) for labels, bodies in groups.items()]


class ParcaWriter:
    """Writes profiles with ``parca.profilestore.v1alpha1.ProfileStoreService/WriteRaw``."""

    def __init__(self, connection: StoreConnection):
        self.connection = connection

    def write(self, profiles: list[dict]) -> None:
        request = profilestore_pb2.WriteRawRequest()
        for labels, bodies in group_by_series(profiles):
            series = request.series.add()
            for name, value in labels:
                series.labels.labels.add(name=name, value=value)
            for body in bodies:
                series.samples.add(raw_profile=body["pprof"])
        self.connection.call(profilestore_pb2_grpc.ProfileStoreServiceStub, "WriteRaw", request)


class ConprofWriter:
    """Writes profiles with Conprof's ``conprof.WritableProfileStore/Write``."""

    def __init__(self, connection: StoreConnection):
        self.connection = connection

    def write(self, profiles: list[dict]) -> None:
        request = store_pb2.WriteRequest()
        for labels, bodies in group_by_series(profiles):
            series = request.profileSeries.add()
            for name, value in labels:
                series.labels.add(name=name, value=value)
            for body in bodies:
                # Conprof stamps a sample with the end of its window, in milliseconds.
                series.samples.add(value=body["pprof"], timestamp=body["end_ns"] // 1_000_000)
        self.connection.call(store_pb2_grpc.WritableProfileStoreStub, "Write", request)


class Backoff:
    """Exponential backoff with jitter: each failure doubles the wait up to ``cap``; the wait is
    drawn from its upper half so that many agents behind one store do not retry in step."""

    def __init__(self, initial: float = 0.5, cap: float = 30.0):
        self.initial = initial
        self.cap = cap
        self.failures = 0

    def next_delay(self) -> float:
        ceiling = min(self.cap, self.initial * (2 ** min(self.failures, 32)))
        self.failures += 1
        return random.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.failures = 0
