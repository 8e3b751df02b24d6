"""GNU build ids of mapped files, read once per file (by device, inode, size and mtime)."""

from __future__ import annotations

import os
from collections import OrderedDict

from elftools.elf.elffile import ELFFile

MAX_CACHED_FILES = 4096


def read_build_id(fh) -> str:
    """The NT_GNU_BUILD_ID note of an open ELF file as hex, or "" when it has none."""
    elf = ELFFile(fh)
    for segment in elf.iter_segments():
        if segment["p_type"] != "PT_NOTE":
            continue
        for note in segment.iter_notes():
            if note["n_type"] == "NT_GNU_BUILD_ID" and note["n_name"] == "GNU":
                desc = note["n_desc"]
                return desc if isinstance(desc, str) else bytes(desc).hex()
    return ""


class BuildIdCache:
    """Maps a file's identity to its build id; a malformed file gets "" and is not read again."""

    def __init__(self, max_files: int = MAX_CACHED_FILES):
        self._by_file: OrderedDict[tuple, str] = OrderedDict()
        self.max_files = max_files
        self.errors = 0

    def lookup(self, path: str) -> tuple[str, tuple | None]:
        """(build id, file identity) of the file at path; identity None when it cannot be read."""
        try:
            st = os.stat(path)
        except OSError:
            return "", None
        ident = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        if ident in self._by_file:
            self._by_file.move_to_end(ident)
            return self._by_file[ident], ident
        try:
            with open(path, "rb") as fh:
                build_id = read_build_id(fh)
        except Exception:  # pyelftools raises many types on hostile files; the file loses only its id
            self.errors += 1
            build_id = ""
        self._by_file[ident] = build_id
        if len(self._by_file) > self.max_files:
            self._by_file.popitem(last=False)
        return build_id, ident
