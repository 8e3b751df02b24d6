"""Built unwind tables on disk, by build id, so that a restarted collector does not build them
again.

Building the table of a large library takes the collector up to seconds of CPU (libpython3.11:
about one), and without this every restart (an upgrade, a crash, a node reboot) paid it again
for every binary in use. A table is the same for every copy of a file with one build id, so it
is kept in <cache-dir>/unwind/<build id>.table, written once and read back on the next start.

Only root reads and writes the folder (0700): the rows go into BPF maps, and a tampered table
could only give wrong stacks (the verifier keeps the kernel safe whatever the rows say), but
nobody else needs them. Each file carries a format version and a CRC32 of its contents; one
that does not check out is deleted and counted, and the table is built again. The folder is
bounded in bytes: the least recently used files go first (their mtime is touched when read, and
at most hourly while the collector keeps using the table from memory).
"""

from __future__ import annotations

import logging
import os
import struct
import time
import zlib

from services.collector.unwind.eh_frame import ROW, UnwindTable

log = logging.getLogger("parca_agent.collector.unwind")

DEFAULT_MAX_BYTES = 256 << 20
TOUCH_EVERY = 3600.0  # seconds between mtime updates of a table in use from memory
TOUCHED_MAX = 4096  # build ids whose last touch is remembered; past it, forgotten (a touch more)
MAGIC = b"PAUT"
# Bump when the rows' layout (eh_frame.ROW) or their meaning changes: older files are rebuilt.
VERSION = 1
HEADER = struct.Struct("<4sIQQI")  # magic, version, fdes, unsupported rows, segments
SEGMENT = struct.Struct("<QQQ")  # offset, filesz, vaddr
SUFFIX = ".table"
_HEX = frozenset("0123456789abcdef")


class TableStore:
    def __init__(self, directory: str, max_bytes: int = DEFAULT_MAX_BYTES, metrics=None):
        self.directory = directory
        self.max_bytes = max_bytes
        self.metrics = metrics
        os.makedirs(directory, mode=0o700, exist_ok=True)
        os.chmod(directory, 0o700)
        self.bytes = sum(size for _, size, _ in self._files())
        self._touched: dict[str, float] = {}  # build id -> monotonic time of its last touch

    def load(self, build_id: str) -> UnwindTable | None:
        """The table stored for this build id, or None (none stored, or it did not check out)."""
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
        table = _decode(data)
        if table is None:
            self._bad(path, "corrupt or of another format version")
            return None
        self._utime(build_id, path)  # recently used: evicted last
        self._count("unwind_tables_loaded_from_disk_total")
        return table

    def touch(self, build_id: str) -> None:
        """The table is still in use (from memory): keep it from eviction, at most hourly."""
        if time.monotonic() - self._touched.get(build_id, -TOUCH_EVERY) < TOUCH_EVERY:
            return
        path = self._path(build_id)
        if path is not None:
            self._utime(build_id, path)

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

    def save(self, build_id: str, table: UnwindTable) -> None:
        path = self._path(build_id)
        if path is None:
            return
        data = _encode(table)
        if len(data) > self.max_bytes:
            return
        tmp = f"{path}.{os.getpid()}.tmp"
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
        except OSError as e:  # a full disk costs the next start a rebuild, nothing more
            log.debug("could not store the unwind table of %s: %s", build_id, e)
            self._count("unwind_table_store_failures_total")
            try:
                os.unlink(tmp)
            except OSError:
                pass
            return
        self._note_touched(build_id)  # just written: no touch needed for an hour
        self.bytes += len(data)
        if self.bytes > self.max_bytes:
            self._evict()

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
            self._count("unwind_tables_evicted_from_disk_total")

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
        return os.path.join(self.directory, build_id + SUFFIX)

    def _bad(self, path: str, why: str) -> None:
        log.warning("unwind table %s: %s; building it again", os.path.basename(path), why)
        self._count("unwind_tables_corrupt_total")
        try:
            os.unlink(path)
        except OSError:
            pass

    def _count(self, name: str) -> None:
        if self.metrics is not None:
            self.metrics.inc(name)


def _encode(table: UnwindTable) -> bytes:
    parts = [HEADER.pack(MAGIC, VERSION, table.fdes, table.unsupported_rows,
                         len(table.segments))]
    parts += [SEGMENT.pack(*segment) for segment in table.segments]
    parts.append(table.rows)
    body = b"".join(parts)
    return body + struct.pack("<I", zlib.crc32(body))


def _decode(data: bytes) -> UnwindTable | None:
    if len(data) < HEADER.size + 4:
        return None
    body, (crc,) = data[:-4], struct.unpack("<I", data[-4:])
    if zlib.crc32(body) != crc:
        return None
    magic, version, fdes, unsupported, n_segments = HEADER.unpack_from(body)
    rows_at = HEADER.size + n_segments * SEGMENT.size
    if magic != MAGIC or version != VERSION or rows_at > len(body) \
            or (len(body) - rows_at) % ROW.size:
        return None
    segments = tuple(SEGMENT.unpack_from(body, HEADER.size + i * SEGMENT.size)
                     for i in range(n_segments))
    return UnwindTable(rows=body[rows_at:], fdes=fdes, unsupported_rows=unsupported,
                       segments=segments)
