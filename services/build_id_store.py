"""Files derived from binaries, kept on disk by build id, so that a restarted service does not
derive them again: the collector's unwind tables (collector/unwind/table_store.py) and the
aggregator's symbol tables (aggregator/symbol_store.py).

What is derived from a file is the same for every copy with one build id, and deriving it costs
a service start real CPU for every binary in use (an unwind table of libpython3.11: about a
second; the symbol tables of libc, ld.so and python3.11: about 60 ms together). A subclass says
how its object becomes bytes and back; this keeps them: one file per build id, written whole
(a temporary file, then a rename), a CRC32 of the contents at the end (a file that does not
check out, or that the subclass cannot decode, is deleted, counted and derived again), and a
bound in bytes: the least recently used files go first (their mtime is touched when read, and
at most hourly while the service keeps using the object from memory).

Only the service's own user reads and writes its folder (0700).
"""

from __future__ import annotations

import logging
import os
import struct
import time
import zlib

log = logging.getLogger("parca_agent.build_id_store")

TOUCH_EVERY = 3600.0  # seconds between mtime updates of an object in use from memory
TOUCHED_MAX = 4096  # build ids whose last touch is remembered; past it, forgotten (a touch more)
_HEX = frozenset("0123456789abcdef")
_CRC = struct.Struct("<I")


def frame(body: bytes) -> bytes:
    """A file's bytes: the encoded object and the CRC32 that load checks."""
    return body + _CRC.pack(zlib.crc32(body))


class BuildIdStore:
    """Subclasses set SUFFIX, METRIC (the metrics' prefix, e.g. "unwind_tables") and
    DEFAULT_MAX_BYTES, and implement encode and decode (static: the format alone)."""

    SUFFIX = ".bin"
    METRIC = "objects"
    DEFAULT_MAX_BYTES = 64 << 20

    def __init__(self, directory: str, max_bytes: int | None = None, metrics=None):
        self.directory = directory
        self.max_bytes = self.DEFAULT_MAX_BYTES if max_bytes is None else max_bytes
        self.metrics = metrics
        os.makedirs(directory, mode=0o700, exist_ok=True)
        os.chmod(directory, 0o700)
        self.bytes = sum(size for _, size, _ in self._files())
        self._touched: dict[str, float] = {}  # build id -> monotonic time of its last touch

    @staticmethod
    def encode(obj) -> bytes:
        raise NotImplementedError

    @staticmethod
    def decode(data: bytes):
        """The object, or None when the bytes are not one (another format version, say)."""
        raise NotImplementedError

    def load(self, build_id: str):
        """The object stored for this build id, or None (none stored, or it did not check out)."""
        path = self._path(build_id)
        if path is None:
            return None
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        except FileNotFoundError:
            return None
        except OSError as e:
            self._bad(path, f"unreadable: {e}")
            return None
        obj = None
        if len(data) >= _CRC.size and zlib.crc32(data[:-_CRC.size]) == \
                _CRC.unpack_from(data, len(data) - _CRC.size)[0]:
            try:
                obj = self.decode(data[:-_CRC.size])
            except (ValueError, UnicodeDecodeError, struct.error):
                obj = None
        if obj is None:
            self._bad(path, "corrupt or of another format version")
            return None
        self._utime(build_id, path)  # recently used: evicted last
        self._count(f"{self.METRIC}_loaded_from_disk_total")
        return obj

    def touch(self, build_id: str) -> None:
        """The object is still in use (from memory): keep it from eviction, at most hourly."""
        if time.monotonic() - self._touched.get(build_id, -TOUCH_EVERY) < TOUCH_EVERY:
            return
        path = self._path(build_id)
        if path is not None:
            self._utime(build_id, path)

    def save(self, build_id: str, obj) -> None:
        path = self._path(build_id)
        if path is None:
            return
        data = frame(self.encode(obj))
        if len(data) > self.max_bytes:
            return
        tmp = f"{path}.{os.getpid()}.tmp"
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
        except OSError as e:  # a full disk costs the next start the work again, nothing more
            log.debug("could not store %s%s: %s", build_id, self.SUFFIX, e)
            self._count(f"{self.METRIC}_store_failures_total")
            try:
                os.unlink(tmp)
            except OSError:
                pass
            return
        self._note_touched(build_id)  # just written: no touch needed for an hour
        self.bytes += len(data)
        if self.bytes > self.max_bytes:
            self._evict()

    def _note_touched(self, build_id: str) -> None:
        if len(self._touched) >= TOUCHED_MAX:
            self._touched.clear()
        self._touched[build_id] = time.monotonic()

    def _utime(self, build_id: str, path: str) -> None:
        self._note_touched(build_id)
        try:
            os.utime(path)
        except OSError:
            pass

    def _evict(self) -> None:
        files = sorted(self._files(), key=lambda f: f[2])  # oldest use first
        self.bytes = sum(size for _, size, _ in files)
        for path, size, _ in files:
            if self.bytes <= self.max_bytes:
                break
            try:
                os.unlink(path)
            except OSError:
                continue
            self.bytes -= size
            self._count(f"{self.METRIC}_evicted_from_disk_total")

    def _files(self) -> list[tuple[str, int, float]]:
        out = []
        for name in os.listdir(self.directory):
            path = os.path.join(self.directory, name)
            if name.endswith(".tmp"):  # a write cut short by a crash
                try:
                    os.unlink(path)
                except OSError:
                    pass
                continue
            try:
                st = os.stat(path)
            except OSError:
                continue
            out.append((path, st.st_size, st.st_mtime))
        return out

    def _path(self, build_id: str) -> str | None:
        if not build_id or len(build_id) > 128 or not _HEX.issuperset(build_id):
            return None  # only hex build ids name files: nothing else reaches a path
        return os.path.join(self.directory, build_id + self.SUFFIX)

    def _bad(self, path: str, why: str) -> None:
        log.warning("%s: %s; deriving it again", os.path.basename(path), why)
        self._count(f"{self.METRIC}_corrupt_total")
        try:
            os.unlink(path)
        except OSError:
            pass

    def _count(self, name: str) -> None:
        if self.metrics is not None:
            self.metrics.inc(name)
