"""Symbol tables on disk, by build id, so that a restarted aggregator does not parse the ELF
files of every binary in use again (libc, ld.so and python3.11 alone: about 60 ms of CPU with
pyelftools; a node's hundreds of binaries: seconds). Reading one back is a few array copies.

<cache-dir>/symbols/<build id>.symbols, the aggregator's own (0700). Files, CRC, eviction and
touching: services/build_id_store.py; this module owns the format. A table is stored with
whether its names came from a separate debug file: one stored without, for a build id whose
debug file has been installed since (/usr/lib/debug/.build-id/), is parsed again.
"""

from __future__ import annotations

import struct
from array import array

from services.aggregator.symbols import SymbolTable
from services.build_id_store import BuildIdStore

MAGIC = b"PAST"
VERSION = 1  # bump when the layout or the meaning of a field changes: older files are parsed again
HEADER = struct.Struct("<4sIIIII")  # magic, version, from_debug, segments, symbols, names bytes
SEGMENT = struct.Struct("<QQQ")  # file offset, size in the file, vaddr


class SymbolStore(BuildIdStore):
    SUFFIX = ".symbols"
    METRIC = "symbol_tables"
    DEFAULT_MAX_BYTES = 64 << 20

    @staticmethod
    def encode(table: SymbolTable) -> bytes:
        names = "\0".join(table.names).encode("utf-8", "surrogatepass")
        parts = [HEADER.pack(MAGIC, VERSION, int(table.from_debug), len(table.segments),
                             len(table.starts), len(names))]
        parts += [SEGMENT.pack(*segment) for segment in table.segments]
        parts += [table.starts.tobytes(), table.ends.tobytes(), names]
        return b"".join(parts)

    @staticmethod
    def decode(data: bytes) -> SymbolTable | None:
        if len(data) < HEADER.size:
            return None
        magic, version, from_debug, n_segments, n_symbols, names_size = HEADER.unpack_from(data)
        at = HEADER.size + n_segments * SEGMENT.size
        if magic != MAGIC or version != VERSION or \
                len(data) != at + 16 * n_symbols + names_size:
            return None
        segments = [SEGMENT.unpack_from(data, HEADER.size + i * SEGMENT.size)
                    for i in range(n_segments)]
        starts, ends = array("Q"), array("Q")
        starts.frombytes(data[at:at + 8 * n_symbols])
        ends.frombytes(data[at + 8 * n_symbols:at + 16 * n_symbols])
        blob = data[at + 16 * n_symbols:]
        names = blob.decode("utf-8", "surrogatepass").split("\0") if n_symbols else []
        if len(names) != n_symbols:
            return None
        return SymbolTable("", segments, starts, ends, names, from_debug=bool(from_debug))

    def load(self, build_id: str) -> SymbolTable | None:
        table = super().load(build_id)
        if table is not None:
            table.build_id = build_id  # the file's name: the key it was stored under
        return table
