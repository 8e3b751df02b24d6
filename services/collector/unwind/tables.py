"""Where unwind tables live: built tables by file in a bounded LRU, and slices of the BPF arrays.

A table is built once per file version (build id, else device, inode and mtime) and kept in
user-space memory up to a byte bound, least recently used out first, so a process that starts
again (a shell loop, a cron job) costs a copy into BPF, not a rebuild. Tables of files with a
build id also go to disk (table_store), so a restarted collector reads them back instead of
building them again. Failures are cached too (as None): a file without CFI is not reopened for
every process that maps it.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
from collections.abc import Callable

from services.collector.unwind.eh_frame import TableError, UnwindTable, build_table
from services.collector.unwind.table_store import TableStore

DEFAULT_CACHE_BYTES = 32 << 20


class RangeAllocator:
    """First-fit slices of [0, capacity): the rows and mappings arrays shared in BPF."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._free: list[tuple[int, int]] = [(0, capacity)] if capacity else []  # (start, size)

    @property
    def available(self) -> int:
        return sum(size for _, size in self._free)

    def allocate(self, size: int) -> int | None:
        if size <= 0:
            return 0
        for i, (start, free) in enumerate(self._free):
            if free >= size:
                if free == size:
                    del self._free[i]
                else:
                    self._free[i] = (start + size, free - size)
                return start
        return None

    def release(self, start: int, size: int) -> None:
        if size <= 0:
            return
        i = bisect.bisect_left(self._free, (start, 0))
        self._free.insert(i, (start, size))
        # Merge with the neighbours so that large tables still find room later.
        if i + 1 < len(self._free) and start + size == self._free[i + 1][0]:
            self._free[i] = (start, size + self._free[i + 1][1])
            del self._free[i + 1]
        if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == start:
            self._free[i - 1] = (self._free[i - 1][0], self._free[i - 1][1] + self._free[i][1])
            del self._free[i]


class TableCache:
    """Built tables by file key, bounded in bytes of rows, least recently used evicted first."""

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES,
                 build: Callable[[str], UnwindTable] = build_table,
                 store: TableStore | None = None):
        self.max_bytes = max_bytes
        self.store = store
        self.bytes = 0
        self._build = build
        self._tables: OrderedDict[str, UnwindTable | None] = OrderedDict()
        self.builds = 0
        self.failures: dict[str, int] = {}

    def get(self, key: str, path: str) -> UnwindTable | None:
        if key in self._tables:
            self._tables.move_to_end(key)
            if self.store is not None:
                self.store.touch(key)  # in use: the copy on disk should outlive unused ones
            return self._tables[key]
        table = self.store.load(key) if self.store is not None else None
        if table is None:
            self.builds += 1
            try:
                table = self._build(path)
            except TableError as e:
                self.failures[e.reason] = self.failures.get(e.reason, 0) + 1
                table = None
            if table is not None and self.store is not None:
                self.store.save(key, table)  # only a build id names a stored table
        size = len(table.rows) if table else 0
        if size > self.max_bytes:
            return table  # used now, never kept: it alone would empty the cache
        self._tables[key] = table
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, old = self._tables.popitem(last=False)
            self.bytes -= len(old.rows) if old else 0
        return table

    def __len__(self) -> int:
        return len(self._tables)
