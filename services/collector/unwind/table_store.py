"""Built unwind tables on disk, by build id, so that a restarted collector does not build them
again.

Building the table of a large library takes the collector up to seconds of CPU (libpython3.11:
about one), and without this every restart (an upgrade, a crash, a node reboot) paid it again
for every binary in use. A table is the same for every copy of a file with one build id, so it
is kept in <cache-dir>/unwind/<build id>.table, written once and read back on the next start.

Only root reads and writes the folder (0700): the rows go into BPF maps, and a tampered table
could only give wrong stacks (the verifier keeps the kernel safe whatever the rows say), but
nobody else needs them. Files, CRC, eviction and touching: services/build_id_store.py; this
module owns the table's format (with its version: a file of another is built again).
"""

from __future__ import annotations

import struct

from services.build_id_store import TOUCH_EVERY, BuildIdStore
from services.collector.unwind.eh_frame import ROW, UnwindTable

MAGIC = b"PAUT"
# Bump when the rows' layout (eh_frame.ROW) or their meaning changes: older files are rebuilt.
VERSION = 1
HEADER = struct.Struct("<4sIQQI")  # magic, version, fdes, unsupported rows, segments
SEGMENT = struct.Struct("<QQQ")  # offset, filesz, vaddr

__all__ = ["TableStore", "TOUCH_EVERY", "VERSION"]


class TableStore(BuildIdStore):
    SUFFIX = ".table"
    METRIC = "unwind_tables"
    DEFAULT_MAX_BYTES = 256 << 20

    @staticmethod
    def encode(table: UnwindTable) -> bytes:
        parts = [HEADER.pack(MAGIC, VERSION, table.fdes, table.unsupported_rows,
                             len(table.segments))]
        parts += [SEGMENT.pack(*segment) for segment in table.segments]
        parts.append(table.rows)
        return b"".join(parts)

    @staticmethod
    def decode(body: bytes) -> UnwindTable | None:
        if len(body) < HEADER.size:
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
