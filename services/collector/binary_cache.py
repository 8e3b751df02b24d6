"""A bounded, content-addressed copy of the binaries that appear in samples, by build id.

The aggregator and shipper are unprivileged: they cannot open files inside containers
(/proc/<pid>/root) or unreadable host binaries. The root collector copies each such file once,
from the mapping itself (map_files), into <cache-dir>/binaries/<build id>, readable by the
agent's group; the aggregator symbolizes from the copy and the shipper uploads it as debuginfo.
Copies run on a background thread so the drain loop never waits on disk.
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import threading
from collections import OrderedDict

log = logging.getLogger("parca_agent.collector")

MAX_FILE_BYTES = 512 * 1024 * 1024  # larger binaries are not copied (counted)
QUEUE_MAX = 256


class BinaryCache:
    def __init__(self, directory: str, max_bytes: int, metrics=None, group: str = "parca-agent"):
        self.directory = directory
        self.max_bytes = max_bytes
        self.metrics = metrics
        os.makedirs(directory, mode=0o750, exist_ok=True)
        self._gid = _group_id(group)
        if self._gid is not None:
            os.chown(directory, 0, self._gid)
            os.chmod(directory, 0o750)
        self._files: OrderedDict[str, int] = OrderedDict()  # build id -> size, oldest use first
        self._lock = threading.Lock()
        for name in sorted(os.listdir(directory), key=lambda n: _mtime(os.path.join(directory, n))):
            if name.endswith(".tmp"):
                os.unlink(os.path.join(directory, name))  # a copy cut short by a crash
                continue
            self._files[name] = _size(os.path.join(directory, name))
        self._pending: set[str] = set()
        self._queue: queue.Queue = queue.Queue(maxsize=QUEUE_MAX)
        self._thread = threading.Thread(target=self._run, name="binary-cache", daemon=True)
        self._thread.start()

    @property
    def total_bytes(self) -> int:
        return sum(self._files.values())

    def path_for(self, build_id: str) -> str:
        return os.path.join(self.directory, build_id)

    def has(self, build_id: str) -> bool:
        with self._lock:
            if build_id in self._files:
                self._files.move_to_end(build_id)
                return True
            return False

    def request(self, build_id: str, source: str) -> None:
        """Copy ``source`` (a map_files path) as ``build_id`` soon, unless it is there already."""
        if not build_id or self.has(build_id) or build_id in self._pending:
            return
        try:
            self._queue.put_nowait((build_id, source))
            self._pending.add(build_id)
        except queue.Full:
            self._count("binary_cache_skipped_total", reason="queue_full")

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=2)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            build_id, source = item
            try:
                self._copy(build_id, source)
            except OSError as e:
                self._count("binary_cache_skipped_total", reason="copy_failed")
                log.debug("could not cache %s: %s", build_id, e)
            finally:
                self._pending.discard(build_id)

    def _copy(self, build_id: str, source: str) -> None:
        if len(build_id) > 128 or not all(c in "0123456789abcdef" for c in build_id):
            self._count("binary_cache_skipped_total", reason="bad_build_id")
            return
        with open(source, "rb") as src:
            size = os.fstat(src.fileno()).st_size
            if size > MAX_FILE_BYTES or size > self.max_bytes:
                self._count("binary_cache_skipped_total", reason="too_large")
                return
            self._make_room(size)
            final = self.path_for(build_id)
            tmp = final + ".tmp"
            with open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 1024 * 1024)
        if self._gid is not None:
            os.chown(tmp, 0, self._gid)
        os.chmod(tmp, 0o640)
        os.replace(tmp, final)
        with self._lock:
            self._files[build_id] = size
        self._count("binary_cache_stored_total")
        if self.metrics:
            self.metrics.set("binary_cache_bytes", self.total_bytes)

    def _make_room(self, size: int) -> None:
        with self._lock:
            while self._files and self.total_bytes + size > self.max_bytes:
                old, _ = self._files.popitem(last=False)
                try:
                    os.unlink(self.path_for(old))
                except FileNotFoundError:
                    pass
                self._count("binary_cache_evicted_total")

    def _count(self, name: str, **labels: str) -> None:
        if self.metrics:
            self.metrics.inc(name, **labels)


def _group_id(group: str) -> int | None:
    import grp

    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        return None


def _mtime(path: str) -> float:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return 0.0


def _size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0
