"""The shipper's bounded on-disk spool: a profile is here, fsync'd, before it is acknowledged.

One file per profile under ``<cache-dir>/spool``, named ``<20-digit ns>-<id hash>.profile`` so
that sorting the names gives the oldest first, also after a restart. A file is written to a
temporary name, fsync'd, renamed into place and the directory fsync'd: a crash leaves either the
whole profile or only a ``.tmp`` file, which the next start removes.

A file holds the profile's wire frames (services.wire encodes them, so the spool needs no format
of its own for the profile) in a small envelope: a magic, the frame count, each frame with its
length, and a CRC32 over all of it, so that a torn or damaged file is recognised, skipped with a
warning and counted (``spool_corrupt_total``), never shipped and never a crash.

When adding a profile would pass ``max_bytes``, the oldest profiles are dropped and counted
(``spool_dropped_total``): during a long outage the newest windows are the ones worth keeping.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import struct
import threading
import time
import zlib
from collections import OrderedDict
from dataclasses import dataclass

from services import runtime, wire

log = logging.getLogger("parca_agent.shipper")

MAGIC = b"PASPOOL1"
SUFFIX = ".profile"
TMP_SUFFIX = ".tmp"
_NAME = re.compile(r"^(\d{20})-([0-9a-f]{32})\.profile$")
# Ids of profiles already spooled or shipped, remembered so that a resend (an ack that did not
# arrive) is acknowledged again instead of shipped twice. The aggregator resends within seconds,
# so this covers hours of windows.
REMEMBERED_IDS = 100_000


class SpoolError(Exception):
    """The profile could not be written (disk full, permissions): do not acknowledge it."""


@dataclass(frozen=True)
class SpoolEntry:
    name: str
    size: int


def id_key(profile_id: str) -> str:
    """The fixed-length, file-name-safe stand-in for a profile id."""
    return hashlib.sha256(profile_id.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def pack_frames(frames: list[bytes]) -> bytes:
    parts = [MAGIC, struct.pack(">I", len(frames))]
    for frame in frames:
        parts.append(struct.pack(">I", len(frame)))
        parts.append(bytes(frame))
    payload = b"".join(parts)
    return payload + struct.pack(">I", zlib.crc32(payload))


def unpack_frames(data: bytes) -> list[bytes]:
    """The frames of a spool file; ValueError when it is torn or damaged."""
    if len(data) < len(MAGIC) + 8 or not data.startswith(MAGIC):
        raise ValueError("no spool header")
    payload, (crc,) = data[:-4], struct.unpack(">I", data[-4:])
    if zlib.crc32(payload) != crc:
        raise ValueError("checksum mismatch")
    (count,), pos = struct.unpack_from(">I", payload, len(MAGIC)), len(MAGIC) + 4
    frames = []
    for _ in range(count):
        if pos + 4 > len(payload):
            raise ValueError("truncated frame length")
        (length,) = struct.unpack_from(">I", payload, pos)
        pos += 4
        if pos + length > len(payload):
            raise ValueError("truncated frame")
        frames.append(payload[pos:pos + length])
        pos += length
    if pos != len(payload):
        raise ValueError("trailing bytes")
    return frames


class Spool:
    """Thread-safe: the receiving loop adds while the sending thread reads and removes."""

    def __init__(self, directory: str, max_bytes: int, metrics: runtime.Metrics):
        self.directory = directory
        self.max_bytes = max_bytes
        self.metrics = metrics
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, int] = OrderedDict()  # name -> size, oldest first
        self._bytes = 0
        self._remembered: OrderedDict[str, None] = OrderedDict()  # id keys
        self._last_stamp = 0
        self._warn = runtime.RateLimitedLog(log)
        os.makedirs(directory, exist_ok=True)
        self._scan()

    # -- adding -------------------------------------------------------------------------------

    def add(self, profile_id: str, frames: list[bytes]) -> str:
        """Write one profile; return "spooled", "duplicate" or "too_large"; raise SpoolError."""
        key = id_key(profile_id)
        data = pack_frames(frames)
        with self._lock:
            if key in self._remembered:
                self._remembered.move_to_end(key)
                return "duplicate"
            if len(data) > self.max_bytes:
                self.metrics.inc("spool_dropped_total", reason="too_large")
                self._remember(key)
                return "too_large"
            while self._entries and self._bytes + len(data) > self.max_bytes:
                self._drop_oldest()
            name = f"{self._stamp():020d}-{key}{SUFFIX}"
            self._write(name, data)
            self._entries[name] = len(data)
            self._bytes += len(data)
            self._remember(key)
            self._update_gauges()
        self.metrics.inc("profiles_spooled_total")
        return "spooled"

    def _write(self, name: str, data: bytes) -> None:
        path = os.path.join(self.directory, name)
        tmp = path + TMP_SUFFIX
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, path)
            self._fsync_directory()
        except OSError as e:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            reason = errno.errorcode.get(e.errno or 0, "oserror")
            self.metrics.inc("spool_errors_total", reason=reason)
            raise SpoolError(f"cannot write {path}: {e.strerror or e}") from None

    def _fsync_directory(self) -> None:
        # The rename is durable only once the directory is on disk too.
        fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _stamp(self) -> int:
        # Wall-clock nanoseconds keep the order across restarts; never equal or backwards within
        # one run, so that names stay unique and ordered when the clock steps.
        self._last_stamp = max(time.time_ns(), self._last_stamp + 1)
        return self._last_stamp

    def _remember(self, key: str) -> None:
        self._remembered[key] = None
        while len(self._remembered) > REMEMBERED_IDS:
            self._remembered.popitem(last=False)

    def _drop_oldest(self) -> None:
        name, size = self._entries.popitem(last=False)
        self._bytes -= size
        self._unlink(name)
        self.metrics.inc("spool_dropped_total", reason="full")
        self._warn.warning("spool_full", f"spool is full ({self.max_bytes} bytes): dropped the "
                                         f"oldest profile to make room")

    # -- reading and removing -----------------------------------------------------------------

    def oldest(self, max_count: int, max_bytes: int) -> list[SpoolEntry]:
        """The oldest entries, at least one when any, within max_count and max_bytes."""
        batch: list[SpoolEntry] = []
        total = 0
        with self._lock:
            for name, size in self._entries.items():
                if batch and (len(batch) >= max_count or total + size > max_bytes):
                    break
                batch.append(SpoolEntry(name, size))
                total += size
        return batch

    def load(self, entry: SpoolEntry) -> wire.Message | None:
        """The profile of an entry; None when it was dropped meanwhile or is corrupt (removed)."""
        path = os.path.join(self.directory, entry.name)
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        except FileNotFoundError:
            return None
        except OSError as e:
            return self._corrupt(entry, f"unreadable: {e.strerror or e}")
        try:
            msg = wire.decode(unpack_frames(data))
        except (ValueError, wire.WireError) as e:
            return self._corrupt(entry, str(e))
        if msg.type != "profile":
            return self._corrupt(entry, f"holds a {msg.type} message")
        return msg

    def remove(self, entries: list[SpoolEntry]) -> None:
        with self._lock:
            for entry in entries:
                size = self._entries.pop(entry.name, None)
                if size is not None:
                    self._bytes -= size
                    self._unlink(entry.name)
            self._update_gauges()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    @property
    def bytes(self) -> int:
        with self._lock:
            return self._bytes

    def _corrupt(self, entry: SpoolEntry, why: str) -> None:
        self.metrics.inc("spool_corrupt_total")
        self._warn.warning("spool_corrupt", f"skipped corrupt spool file {entry.name}: {why}")
        self.remove([entry])
        return None

    def _unlink(self, name: str) -> None:
        try:
            os.unlink(os.path.join(self.directory, name))
        except FileNotFoundError:
            pass
        except OSError as e:
            self.metrics.inc("spool_errors_total", reason="unlink")
            self._warn.warning("spool_unlink", f"cannot remove spool file {name}: {e}")

    # -- start-up -----------------------------------------------------------------------------

    def _scan(self) -> None:
        """Take up what a previous run left: whole files in name order; torn ones removed."""
        found = []
        for name in os.listdir(self.directory):
            path = os.path.join(self.directory, name)
            if name.endswith(TMP_SUFFIX):
                self._unlink(name)  # a write that a crash interrupted; never acknowledged
                continue
            match = _NAME.match(name)
            if not match:
                self.metrics.inc("spool_corrupt_total")
                log.warning("ignoring unexpected file in the spool: %s", path)
                continue
            try:
                size = os.stat(path).st_size
            except OSError:
                continue
            found.append((name, size, match.group(2)))
        for name, size, key in sorted(found):
            self._entries[name] = size
            self._bytes += size
            self._remember(key)
            self._last_stamp = max(self._last_stamp, int(name[:20]))
        with self._lock:
            while self._entries and self._bytes > self.max_bytes:
                self._drop_oldest()
            self._update_gauges()
        if found:
            log.info("spool holds %d profiles (%d bytes) from a previous run",
                     len(self._entries), self._bytes)

    def _update_gauges(self) -> None:
        self.metrics.set("spool_bytes", self._bytes)
        self.metrics.set("spool_files", len(self._entries))
