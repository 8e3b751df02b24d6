"""Readers of /proc/<pid>: name, start time, executable, command line and file mappings.

Every path is under ``proc`` (a parameter) so tests can point these at fixture trees. Every
value read here is attacker-controlled text (a process names itself as it likes): it is kept as
data, bounded in length, and never interpreted.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

MAX_CMDLINE_BYTES = 4096
MAX_MAPS_BYTES = 8 * 1024 * 1024  # a JVM can map tens of thousands of regions; stop well before


@dataclass(frozen=True)
class ProcStat:
    comm: str
    start_time: int  # clock ticks after boot: with the pid, names one process across pid reuse


@dataclass(frozen=True)
class MapEntry:
    start: int
    limit: int
    offset: int
    path: str  # as /proc/<pid>/maps prints it, " (deleted)" removed
    inode: int
    deleted: bool


@dataclass(frozen=True)
class MapsSnapshot:
    """A process's mappings as the process table read them (``read_at``: monotonic), with each
    file's (build id, identity) by mapping start. Handed to the unwind loader, which would
    otherwise read the maps again and stat every /proc/<pid>/map_files entry again (~45 us each
    on a busy host) for a process it loads right after."""
    start_time: int
    read_at: float
    entries: tuple[MapEntry, ...]
    files: dict[int, tuple[str, tuple | None]]


def read_stat(pid: int, proc: str = "/proc") -> ProcStat | None:
    # os.open/os.read: read every few seconds for each sampled process, and a buffered file
    # object costs more than the read itself.
    try:
        fd = os.open(f"{proc}/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        raw = os.read(fd, 4096)
    except OSError:
        return None
    finally:
        os.close(fd)
    # comm sits between the first "(" and the last ")": it may itself contain ")" and spaces.
    open_at, close_at = raw.find(b"("), raw.rfind(b")")
    if open_at < 0 or close_at < open_at:
        return None
    comm = raw[open_at + 1:close_at].decode("utf-8", "replace")
    fields = raw[close_at + 2:].split()
    try:
        start_time = int(fields[19])  # field 22 overall; fields here start at field 3 (state)
    except (IndexError, ValueError):
        return None
    return ProcStat(comm=comm, start_time=start_time)


MAX_ENVIRON_BYTES = 1 << 20


def has_environ_entry(pid: int, entry: bytes, proc: str = "/proc") -> bool:
    """Whether the process started with ``entry`` (``NAME=value``) in its environment."""
    try:
        with open(f"{proc}/{pid}/environ", "rb") as fh:
            return entry in fh.read(MAX_ENVIRON_BYTES).split(b"\0")
    except OSError:
        return False


def read_exe(pid: int, proc: str = "/proc") -> str:
    try:
        return os.readlink(f"{proc}/{pid}/exe")
    except OSError:
        return ""


def read_cmdline(pid: int, proc: str = "/proc") -> list[str]:
    try:
        with open(f"{proc}/{pid}/cmdline", "rb") as fh:
            raw = fh.read(MAX_CMDLINE_BYTES)
    except OSError:
        return []
    return [a.decode("utf-8", "replace") for a in raw.rstrip(b"\0").split(b"\0") if a]


def parse_maps(text: bytes) -> list[MapEntry]:
    """Executable, file-backed (and [vdso]) regions of a maps file."""
    entries = []
    for line in text.splitlines():
        parts = line.split(None, 5)
        if len(parts) < 5 or b"x" not in parts[1]:
            continue
        path = parts[5].decode("utf-8", "replace") if len(parts) == 6 else ""
        if not (path.startswith("/") or path == "[vdso]"):
            continue  # anonymous JIT code has no file to symbolize from
        deleted = path.endswith(" (deleted)")
        if deleted:
            path = path[: -len(" (deleted)")]
        try:
            start, limit = (int(x, 16) for x in parts[0].split(b"-"))
            offset = int(parts[2], 16)
            inode = int(parts[4])
        except ValueError:
            continue
        entries.append(MapEntry(start, limit, offset, path, inode, deleted))
    return entries


def read_maps(pid: int, proc: str = "/proc") -> list[MapEntry] | None:
    try:
        with open(f"{proc}/{pid}/maps", "rb") as fh:
            raw = fh.read(MAX_MAPS_BYTES)
    except OSError:
        return None
    return parse_maps(raw)


def mapped_file_path(pid: int, entry: MapEntry, proc: str = "/proc") -> str:
    """A path that opens exactly the mapped file, also inside containers and when deleted.

    map_files/ links are kernel references to the mapping's file, so no symlink inside a
    container's root can redirect the (root) collector to another file on the host.
    """
    return f"{proc}/{pid}/map_files/{entry.start:x}-{entry.limit:x}"


def same_mount_namespace(pid: int, proc: str = "/proc") -> bool:
    try:
        return os.stat(f"{proc}/{pid}/ns/mnt").st_ino == os.stat(f"{proc}/self/ns/mnt").st_ino
    except OSError:
        return False


def exists(pid: int, proc: str = "/proc") -> bool:
    return os.path.exists(f"{proc}/{pid}")
