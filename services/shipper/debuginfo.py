"""Uploads the binaries behind shipped profiles to the store's debuginfo service, once per build id.

For each build id in a shipped profile's mappings: find the file, ask the store
(``ShouldInitiateUpload``), and if it wants it, ``InitiateUpload``, send the bytes (the ``Upload``
stream, or an HTTP PUT when the store hands out a signed URL) and ``MarkUploadFinished``.

The file comes from the binary cache, ``<cache-dir>/binaries/<build id>``, which the privileged
collector fills (this unprivileged service cannot open files inside containers), or else from the
mapping's path when it is readable here and carries the same build id. Neither: skipped, and
looked for again later, since the collector may cache it meanwhile.

Uploaded build ids are recorded in ``<cache-dir>/debuginfo-uploaded`` (one a line) so that a
restart does not ask again; build ids the store declined are remembered until the restart.
Uploads run on a small thread pool so that a large binary never holds up the profiles.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import os
import re
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

import services.proto_gen  # noqa: F401  (puts the generated packages on sys.path)
from parca.debuginfo.v1alpha1 import debuginfo_pb2, debuginfo_pb2_grpc
from pprof import profile_pb2
from services import runtime
from services.shipper.store_client import StoreConnection, StoreError

log = logging.getLogger("parca_agent.shipper")

MAX_CONCURRENT_UPLOADS = 2  # a binary is read whole and hashed: keep disk and memory modest
CHUNK_BYTES = 512 * 1024  # well under gRPC's default 4 MiB message limit
UPLOAD_TIMEOUT = 300.0  # seconds for one binary's upload stream
RETRY_AFTER = 300.0  # seconds before trying a build id again after a file was missing or a failure
MAX_PPROF_BYTES = 256 * 1024 * 1024  # unzipped; more is not a profile the aggregator made
_BUILD_ID = re.compile(r"^[0-9a-f]{8,128}$")
RECORD_FILE = "debuginfo-uploaded"
BINARIES_DIR = "binaries"


def mapping_build_ids(pprof_gz: bytes) -> dict[str, str]:
    """build id -> the mapping's file name, for every file mapping with a GNU build id."""
    with gzip.GzipFile(fileobj=io.BytesIO(pprof_gz)) as fh:
        raw = fh.read(MAX_PPROF_BYTES + 1)
    if len(raw) > MAX_PPROF_BYTES:
        raise ValueError("profile too large")
    profile = profile_pb2.Profile.FromString(raw)
    strings = profile.string_table

    def text(index: int) -> str:
        return strings[index] if 0 <= index < len(strings) else ""

    found = {}
    for mapping in profile.mapping:
        build_id = text(mapping.build_id).lower()
        filename = text(mapping.filename)
        # "[kernel.kallsyms]", "[vdso]": no file the store could use.
        if _BUILD_ID.match(build_id) and not filename.startswith("["):
            found.setdefault(build_id, filename)
    return found


def elf_build_id(path: str) -> str:
    """The GNU build id of an ELF file, or "" when it has none or is not ELF."""
    try:
        with open(path, "rb") as fh:
            for section in ELFFile(fh).iter_sections():
                if section.header.sh_type != "SHT_NOTE":
                    continue
                for note in section.iter_notes():
                    if note["n_type"] == "NT_GNU_BUILD_ID":
                        return str(note["n_desc"]).lower()
    except (OSError, ELFError, ValueError):
        pass
    return ""


class DebuginfoUploader:
    def __init__(self, connection: StoreConnection, cache_dir: str, metrics: runtime.Metrics, *,
                 max_workers: int = MAX_CONCURRENT_UPLOADS, retry_after: float = RETRY_AFTER):
        self.connection = connection
        self.metrics = metrics
        self.binaries_dir = os.path.join(cache_dir, BINARIES_DIR)
        self.record_path = os.path.join(cache_dir, RECORD_FILE)
        self.retry_after = retry_after
        self._lock = threading.Lock()
        self._settled: set[str] = self._load_record()  # uploaded, or declined by the store
        self._busy: set[str] = set()
        self._retry_at: dict[str, float] = {}
        self._pool = ThreadPoolExecutor(max_workers=max_workers,
                                        thread_name_prefix="debuginfo-upload")
        self._warn = runtime.RateLimitedLog(log, interval=60.0)

    def observe(self, pprof_gz: bytes) -> None:
        """Queue an upload for each build id of this profile not yet settled."""
        try:
            mappings = mapping_build_ids(pprof_gz)
        except Exception as e:  # gzip, protobuf and size errors alike: the profile is shipped
            self.metrics.inc("debuginfo_profiles_unreadable_total")
            self._warn.warning("pprof", f"cannot read mappings of a shipped profile: {e}")
            return
        now = time.monotonic()
        for build_id, filename in mappings.items():
            with self._lock:
                if (build_id in self._settled or build_id in self._busy
                        or self._retry_at.get(build_id, 0.0) > now):
                    continue
                self._busy.add(build_id)
            try:
                self._pool.submit(self._upload_guarded, build_id, filename)
            except RuntimeError:  # the pool is shut down: the shipper is stopping
                return

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _upload_guarded(self, build_id: str, filename: str) -> None:
        outcome = "retry"
        try:
            outcome = self._upload(build_id, filename)
        except StoreError as e:
            self.metrics.inc("debuginfo_upload_failures_total", code=e.code)
            self._warn.warning("upload_" + e.code, f"debuginfo upload of {build_id} failed: {e}")
            outcome = "retry" if e.retryable else "settled"
        except Exception as e:  # a bad file or a bug must not end the upload thread's work
            self.metrics.inc("debuginfo_upload_failures_total", code="error")
            self._warn.warning("upload_error", f"debuginfo upload of {build_id} failed: {e!r}")
        finally:
            with self._lock:
                self._busy.discard(build_id)
                if outcome == "settled":
                    self._settled.add(build_id)
                else:
                    self._retry_at[build_id] = time.monotonic() + self.retry_after

    def _upload(self, build_id: str, filename: str) -> str:
        path = self._find_file(build_id, filename)
        if not path:
            self.metrics.inc("debuginfo_skipped_total", reason="no_file")
            return "retry"
        with open(path, "rb") as fh:
            data = fh.read()
        digest = hashlib.sha256(data).hexdigest()
        gnu = debuginfo_pb2.BUILD_ID_TYPE_GNU
        kind = debuginfo_pb2.DEBUGINFO_TYPE_DEBUGINFO_UNSPECIFIED
        stub = debuginfo_pb2_grpc.DebuginfoServiceStub
        answer = self.connection.call(stub, "ShouldInitiateUpload",
                                      debuginfo_pb2.ShouldInitiateUploadRequest(
                                          build_id=build_id, hash=digest, type=kind,
                                          build_id_type=gnu))
        if not answer.should_initiate_upload:
            log.debug("store does not want %s: %s", build_id, answer.reason)
            self.metrics.inc("debuginfo_skipped_total", reason="not_wanted")
            return "settled"
        started = self.connection.call(stub, "InitiateUpload", debuginfo_pb2.InitiateUploadRequest(
            build_id=build_id, size=len(data), hash=digest, type=kind, build_id_type=gnu))
        instructions = started.upload_instructions
        strategy = instructions.upload_strategy
        if strategy == debuginfo_pb2.UploadInstructions.UPLOAD_STRATEGY_GRPC:
            self.connection.call(stub, "Upload", _chunks(instructions, data),
                                 timeout=UPLOAD_TIMEOUT)
        elif strategy == debuginfo_pb2.UploadInstructions.UPLOAD_STRATEGY_SIGNED_URL:
            _put(instructions.signed_url, data)
        else:
            self.metrics.inc("debuginfo_skipped_total", reason="no_strategy")
            return "settled"
        self.connection.call(stub, "MarkUploadFinished", debuginfo_pb2.MarkUploadFinishedRequest(
            build_id=build_id, upload_id=instructions.upload_id, type=kind))
        self._record(build_id)
        self.metrics.inc("debuginfo_uploads_total")
        self.metrics.inc("debuginfo_upload_bytes_total", len(data))
        log.info("uploaded debuginfo of %s (%d bytes, from %s)", build_id, len(data), path)
        return "settled"

    def _find_file(self, build_id: str, filename: str) -> str:
        cached = os.path.join(self.binaries_dir, build_id)  # build_id is hex: no path tricks
        if os.path.isfile(cached) and os.access(cached, os.R_OK):
            return cached
        # The mapping's path names the file in the process's mount namespace; it is the same
        # file here only when its build id says so (it may have been replaced by an upgrade).
        if filename and os.path.isfile(filename) and elf_build_id(filename) == build_id:
            return filename
        return ""

    def _load_record(self) -> set[str]:
        try:
            with open(self.record_path, encoding="ascii", errors="replace") as fh:
                return {line.strip() for line in fh if _BUILD_ID.match(line.strip())}
        except FileNotFoundError:
            return set()
        except OSError as e:
            log.warning("cannot read %s: %s; debuginfo may be offered again", self.record_path, e)
            return set()

    def _record(self, build_id: str) -> None:
        try:
            with open(self.record_path, "a", encoding="ascii") as fh:
                fh.write(build_id + "\n")
        except OSError as e:
            self._warn.warning("record", f"cannot record uploaded build id in "
                                         f"{self.record_path}: {e}")


def _chunks(instructions, data: bytes):
    yield debuginfo_pb2.UploadRequest(info=debuginfo_pb2.UploadInfo(
        build_id=instructions.build_id, upload_id=instructions.upload_id,
        type=instructions.type))
    for start in range(0, len(data), CHUNK_BYTES):
        yield debuginfo_pb2.UploadRequest(chunk_data=data[start:start + CHUNK_BYTES])


def _put(url: str, data: bytes) -> None:
    request = urllib.request.Request(url, data=data, method="PUT")
    try:
        with urllib.request.urlopen(request, timeout=UPLOAD_TIMEOUT) as response:
            if response.status // 100 != 2:
                raise StoreError("HTTP", f"signed URL upload answered {response.status}",
                                 retryable=True)
    except OSError as e:
        raise StoreError("HTTP", f"signed URL upload failed: {e}", retryable=True) from None
