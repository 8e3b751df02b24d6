"""User-space symbolization from ELF symbol tables (.symtab, else .dynsym), with pyelftools.

A runtime address becomes a file offset through its mapping, then an ELF virtual address through
the PT_LOAD segment holding that offset, then a function through a sorted array of symbol starts.
Stripped files get their names from a separate debug file, found by build id or .gnu_debuglink.
Tables are cached per build id (per file version without one) in a bounded LRU.

Files come from processes we do not control, so every one is untrusted: a file that is missing,
unreadable, not ELF or malformed costs only its own names (None frames), is counted in
``symbolize_errors_total{reason}`` and logged at a rate, never raised. File and line numbers
from DWARF are not read (frames carry function names only).
"""

from __future__ import annotations

import logging
import os
import stat
import struct
import zlib
from array import array
from bisect import bisect_right
from collections import OrderedDict
from dataclasses import dataclass, field
from itertools import repeat
from operator import is_

from elftools.elf.elffile import ELFFile

from services.aggregator.demangle import demangle_all
from services.aggregator.profile_builder import Frame, MappingInfo
from services.runtime import Metrics, RateLimitedLog

log = logging.getLogger("parca_agent.aggregator.symbols")

STT_FUNC, STT_GNU_IFUNC = 2, 10
# Binding preference when several symbols share an address: global, then weak, then local.
_BIND_RANK = {1: 0, 2: 1, 0: 2}
SYMBOL_CHUNK = 65536  # symbol entries decoded per read: bounds the transient memory
MAX_STRTAB_BYTES = 256 << 20  # a larger string table is refused as too large
MAX_CRC_BYTES = 2 << 30  # debug files larger than this are taken without a CRC check
# Nested symbols (a cold part inside its function) hide the outer one from bisect; look back a
# few entries for a symbol that still covers the address.
LOOKBACK = 4
_MISSING = object()
# Addresses whose frames stay cached, over all tables (about 100 bytes each).
MAX_CACHED_FRAMES = 262_144


class SymbolizeError(Exception):
    """One file could not give symbols; ``reason`` is the metric label."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


@dataclass
class SymbolTable:
    """The function symbols and load segments of one ELF file (names maybe from its debug file)."""
    build_id: str
    segments: list[tuple[int, int, int]]  # PT_LOAD (file offset, size in the file, vaddr)
    starts: array  # sorted symbol addresses
    ends: array  # start + size, or 0 when the symbol has no size
    names: list[str]  # mangled, as in the file
    from_debug: bool = False  # the names came from a separate debug file
    # What symbolize found before: file offset -> frame, and one Frame per name. A file's
    # hot addresses come back in every window; the Symbolizer bounds these caches.
    frames: dict[int, Frame | None] = field(default_factory=dict)
    named: dict[str, Frame] = field(default_factory=dict)

    def vaddr(self, file_offset: int) -> int | None:
        for offset, size, vaddr in self.segments:
            if offset <= file_offset < offset + size:
                return file_offset - offset + vaddr
        return None

    def lookup(self, vaddr: int) -> str | None:
        i = bisect_right(self.starts, vaddr) - 1
        for j in range(i, max(i - LOOKBACK, -1), -1):
            end = self.ends[j]
            if end == 0:
                # Unsized: the nearest preceding symbol, but only as the first candidate.
                return self.names[j] if j == i else None
            if vaddr < end:
                return self.names[j]
        return None


class Symbolizer:
    """Finds function names for runtime addresses of mapped ELF files."""

    def __init__(self, metrics: Metrics | None = None, max_files: int = 256,
                 debug_dirs: tuple[str, ...] = ("/usr/lib/debug",),
                 max_symbols: int = 2_000_000, max_frames: int = MAX_CACHED_FRAMES,
                 store=None):
        """max_symbols bounds the function symbols held by all cached tables together (about
        100 bytes each), and so by one file; max_frames the addresses whose frames are kept
        (about 100 bytes each, all dropped when full). store: a SymbolStore (symbol_store.py)
        that keeps parsed tables on disk across restarts, by build id."""
        self.store = store
        self.metrics = metrics
        self.max_files = max_files
        self.debug_dirs = debug_dirs
        self.max_symbols = max_symbols
        self.max_frames = max_frames
        self._tables: OrderedDict[object, SymbolTable] = OrderedDict()
        self._cached_symbols = 0
        self._cached_frames = 0
        # (path, dev, inode, size, mtime) -> table key, or the error that file gave: a bad file
        # is parsed once per version, not once per call.
        self._files: OrderedDict[tuple, object] = OrderedDict()
        self._log = RateLimitedLog(log)

    def symbolize(self, mapping: MappingInfo, candidates: list[str],
                  addresses: list[int]) -> dict[int, Frame | None]:
        """addresses are runtime addresses inside mapping. candidates: file paths to try in order
        (e.g. the agent's binary-cache copy, then the host path). A candidate is used only if its
        ELF build id equals mapping.build_id (when that is non-empty)."""
        return dict(zip(addresses, self.frames(mapping, candidates, addresses)))

    def frames(self, mapping: MappingInfo, candidates: list[str],
               addresses: list[int]) -> list[Frame | None]:
        """What symbolize finds, as a list in the order of addresses."""
        table = self._table_for(mapping, candidates)
        if table is None:
            return [None] * len(addresses)
        # runtime address + shift = file offset, the cache's key (the same in every process)
        offsets = list(map((mapping.offset - mapping.start).__add__, addresses))
        cache = table.frames
        found = list(map(cache.get, offsets, repeat(_MISSING)))
        if not any(map(is_, found, repeat(_MISSING))):  # `in` would call Frame.__eq__
            return found
        if self._cached_frames + len(offsets) > self.max_frames:
            self._drop_frames()
        names: dict[int, str | None] = {}
        for offset in offsets:
            if offset not in cache and offset not in names:
                vaddr = table.vaddr(offset)
                names[offset] = table.lookup(vaddr) if vaddr is not None else None
        named = table.named
        new = {n for n in names.values() if n and n not in named}
        if new:
            for name, readable in demangle_all(new).items():
                named[name] = Frame(readable)
        for offset, name in names.items():
            cache[offset] = named[name] if name else None
        self._cached_frames += len(names)
        return list(map(cache.__getitem__, offsets))

    def _drop_frames(self) -> None:
        for table in self._tables.values():
            table.frames.clear()
            table.named.clear()
        self._cached_frames = 0

    def _table_for(self, mapping: MappingInfo, candidates: list[str]) -> SymbolTable | None:
        want = mapping.build_id.lower()
        if want and want in self._tables:
            self._tables.move_to_end(want)
            if self.store is not None:
                self.store.touch(want)  # in use: kept on disk too (at most an hourly utime)
            return self._tables[want]
        if want and self.store is not None:
            table = self._from_store(want)
            if table is not None:
                self._cache(want, table)
                return table
        for path in candidates:
            try:
                table = self._load(path, mapping.path)
            except SymbolizeError as e:
                self._error(e.reason, f"{path}: {e}")
                continue
            if want and table.build_id != want:
                self._error("build_id_mismatch",
                            f"{path}: build id {table.build_id or 'none'}, mapping has {want}")
                continue
            return table
        return None

    def _from_store(self, build_id: str) -> SymbolTable | None:
        table = self.store.load(build_id)
        if table is not None and not table.from_debug and any(
                os.path.exists(path) for path, _ in self._build_id_debug_files(build_id)):
            return None  # its debug file came since: parse again, for the names it adds
        return table

    def _error(self, reason: str, message: str) -> None:
        if self.metrics is not None:
            self.metrics.inc("symbolize_errors_total", reason=reason)
        self._log.warning(reason, f"no symbols from {message}")

    def _load(self, path: str, mapped_path: str) -> SymbolTable:
        with _open_regular(path) as f:
            st = os.fstat(f.fileno())
            file_key = (path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            known = self._files.get(file_key)
            if isinstance(known, SymbolizeError):
                # A fresh exception: re-raising the cached one would grow its traceback.
                raise SymbolizeError(known.reason, str(known))
            if known is not None and known in self._tables:
                self._tables.move_to_end(known)
                return self._tables[known]
            try:
                table = self._read_table(f, st.st_size, path, mapped_path)
            except SymbolizeError as e:
                if e.reason != "unreadable":  # a permission may change; a file's bytes do not
                    self._remember(file_key, e)
                raise
        key = table.build_id or file_key
        self._remember(file_key, key)
        if self.store is not None and table.build_id:
            self.store.save(table.build_id, table)
        if key in self._tables:  # the same build id under another path
            self._tables.move_to_end(key)
            return self._tables[key]
        self._cache(key, table)
        return table

    def _remember(self, file_key: tuple, value: object) -> None:
        self._files[file_key] = value
        self._files.move_to_end(file_key)
        while len(self._files) > 4 * self.max_files:
            self._files.popitem(last=False)

    def _cache(self, key: object, table: SymbolTable) -> None:
        self._tables[key] = table
        self._cached_symbols += len(table.names)
        while len(self._tables) > 1 and (len(self._tables) > self.max_files
                                         or self._cached_symbols > self.max_symbols):
            _, evicted = self._tables.popitem(last=False)
            self._cached_symbols -= len(evicted.names)
            self._cached_frames -= len(evicted.frames)
            if self.metrics is not None:
                self.metrics.inc("symbolize_cache_evictions_total")

    def _read_table(self, f, size: int, path: str, mapped_path: str) -> SymbolTable:
        elf = _parse(f, size, path)
        try:
            build_id = _build_id(elf)
            segments = [(s["p_offset"], s["p_filesz"], s["p_vaddr"])
                        for s in elf.iter_segments() if s["p_type"] == "PT_LOAD"]
            symtab = _section_of_type(elf, "SHT_SYMTAB")
            symbols = None
            if symtab is None:
                symbols = self._debug_symbols(elf, build_id, path, mapped_path)
            from_debug = symbols is not None
            if symbols is None:
                section = symtab if symtab is not None else _section_of_type(elf, "SHT_DYNSYM")
                symbols = [] if section is None else _function_symbols(
                    elf, section, size, self.max_symbols)
        except SymbolizeError:
            raise
        except Exception as e:  # pyelftools raises many types on a malformed file
            raise SymbolizeError("malformed", f"{type(e).__name__}: {e}") from None
        if len(symbols) >= self.max_symbols:
            self._error("too_many_symbols", f"{path}: kept the first {len(symbols)} symbols")
        table = _table(build_id, segments, symbols)
        table.from_debug = from_debug
        return table

    def _debug_symbols(self, elf: ELFFile, build_id: str, path: str, mapped_path: str):
        """Function symbols of the separate debug file that matches, or None."""
        for candidate, crc in self._debug_candidates(elf, build_id, path, mapped_path):
            try:
                f = _open_regular(candidate)
            except SymbolizeError as e:
                if e.reason != "not_found":
                    self._error(e.reason, f"debug file {candidate}: {e}")
                continue
            with f:
                try:
                    size = os.fstat(f.fileno()).st_size
                    debug = _parse(f, size, candidate)
                    debug_id = _build_id(debug)
                    if build_id and debug_id:
                        matches = debug_id == build_id
                    else:
                        matches = crc is not None and size <= MAX_CRC_BYTES and _crc32(f) == crc
                    symtab = _section_of_type(debug, "SHT_SYMTAB") if matches else None
                    if symtab is not None:
                        return _function_symbols(debug, symtab, size, self.max_symbols)
                except SymbolizeError as e:
                    self._error(e.reason, f"debug file {candidate}: {e}")
                except Exception as e:  # as in _read_table: a malformed debug file
                    self._error("malformed", f"debug file {candidate}: {type(e).__name__}: {e}")
        return None

    def _build_id_debug_files(self, build_id: str):
        """(path, None) of the debug files named by build id, as gdb looks for them."""
        if build_id:
            for d in self.debug_dirs:
                yield os.path.join(d, ".build-id", build_id[:2], build_id[2:] + ".debug"), None

    def _debug_candidates(self, elf: ELFFile, build_id: str, path: str, mapped_path: str):
        """(path, expected CRC or None) in the order gdb searches them."""
        yield from self._build_id_debug_files(build_id)
        link = _debuglink(elf)
        if link is None:
            return
        name, crc = link
        # The agent's cache copy lives apart from its siblings: also look beside the path the
        # process mapped (as the aggregator sees it).
        dirs = dict.fromkeys(os.path.dirname(p) for p in (path, mapped_path) if p)
        for d in dirs:
            yield os.path.join(d, name), crc
            yield os.path.join(d, ".debug", name), crc
            for debug_dir in self.debug_dirs:
                yield os.path.join(debug_dir, d.lstrip("/"), name), crc


def _table(build_id: str, segments: list[tuple[int, int, int]],
           symbols: list[tuple[int, int, str, int]]) -> SymbolTable:
    symbols.sort(key=lambda s: (s[0], s[3], s[1] == 0))
    starts, ends, names = array("Q"), array("Q"), []
    last = None
    for value, size, name, _rank in symbols:
        if value == last:  # an alias of the symbol kept (the best-bound, sized one)
            continue
        last = value
        starts.append(value)
        ends.append(value + size if size else 0)
        names.append(name)
    return SymbolTable(build_id, segments, starts, ends, names)


def _open_regular(path: str):
    """Open a regular file for reading; a FIFO or device would block or never end."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError as e:
        raise SymbolizeError("not_found", str(e)) from None
    except (OSError, ValueError) as e:  # ELOOP, EACCES, a NUL in the path...
        raise SymbolizeError("unreadable", str(e)) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise SymbolizeError("unreadable", "not a regular file")
    return os.fdopen(fd, "rb")


def _parse(f, size: int, path: str) -> ELFFile:
    magic = f.read(4)
    f.seek(0)
    if magic != b"\x7fELF":
        raise SymbolizeError("not_elf", "no ELF magic")
    try:
        return ELFFile(f)
    except Exception as e:  # pyelftools raises many types on a malformed header
        raise SymbolizeError("malformed", f"{type(e).__name__}: {e}") from None


def _section_of_type(elf: ELFFile, sh_type: str):
    for section in elf.iter_sections():
        if section["sh_type"] == sh_type:
            return section
    return None


def _build_id(elf: ELFFile) -> str:
    # Section headers first; a file without them (sstrip) still has the PT_NOTE segment.
    sources = [s for s in elf.iter_sections() if s["sh_type"] == "SHT_NOTE"] or \
        [s for s in elf.iter_segments() if s["p_type"] == "PT_NOTE"]
    for source in sources:
        for note in source.iter_notes():
            if note["n_type"] == "NT_GNU_BUILD_ID" and isinstance(note["n_desc"], str):
                return note["n_desc"].lower()
    return ""


def _debuglink(elf: ELFFile) -> tuple[str, int] | None:
    section = elf.get_section_by_name(".gnu_debuglink")
    if section is None:
        return None
    data = section.data()
    end = data.find(b"\0")
    if end <= 0:
        return None
    crc_at = (end + 4) & ~3  # the name, its NUL, padding to 4 bytes, then the CRC
    if len(data) < crc_at + 4:
        return None
    name = os.path.basename(data[:end].decode("utf-8", "replace"))
    crc = struct.unpack_from("<I" if elf.little_endian else ">I", data, crc_at)[0]
    return name, crc


def _crc32(f) -> int:
    f.seek(0)
    crc = 0
    while chunk := f.read(1 << 20):
        crc = zlib.crc32(chunk, crc)
    return crc


def _check_range(offset: int, size: int, file_size: int) -> None:
    if offset < 0 or size < 0 or offset + size > file_size:
        raise SymbolizeError("malformed", "section beyond the end of the file")


def _function_symbols(elf: ELFFile, section, file_size: int,
                      limit: int) -> list[tuple[int, int, str, int]]:
    """(value, size, name, binding rank) of the defined function symbols of a symbol table.

    pyelftools takes about 30 us per symbol (1 s for a 36,000-symbol library), so it only
    locates the sections; the fixed-size entries are decoded here in bulk with struct.
    """
    is64 = elf.elfclass == 64
    entsize = 24 if is64 else 16
    if section["sh_entsize"] != entsize or section["sh_type"] == "SHT_NOBITS":
        raise SymbolizeError("malformed", f"symbol entries of {section['sh_entsize']} bytes")
    strtab_header = elf.get_section(section["sh_link"]).header
    if strtab_header["sh_size"] > MAX_STRTAB_BYTES:
        raise SymbolizeError("too_large", f"string table of {strtab_header['sh_size']} bytes")
    f = elf.stream
    _check_range(strtab_header["sh_offset"], strtab_header["sh_size"], file_size)
    f.seek(strtab_header["sh_offset"])
    strtab = f.read(strtab_header["sh_size"])
    endian = "<" if elf.little_endian else ">"
    # Field order differs: Elf64_Sym is name, info, other, shndx, value, size;
    # Elf32_Sym is name, value, size, info, other, shndx.
    entry = struct.Struct(endian + ("IBBHQQ" if is64 else "IIIBBH"))
    count = section["sh_size"] // entsize
    offset = section["sh_offset"]
    _check_range(offset, count * entsize, file_size)
    out: list[tuple[int, int, str, int]] = []
    for first in range(0, count, SYMBOL_CHUNK):
        n = min(SYMBOL_CHUNK, count - first)
        f.seek(offset + first * entsize)
        chunk = f.read(n * entsize)
        for fields in entry.iter_unpack(chunk[:len(chunk) // entsize * entsize]):
            if is64:
                name_at, info, _other, shndx, value, size = fields
            else:
                name_at, value, size, info, _other, shndx = fields
            kind = info & 0xF
            if (kind != STT_FUNC and kind != STT_GNU_IFUNC) or shndx == 0 or value == 0:
                continue
            end = strtab.find(b"\0", name_at)
            if end <= name_at:  # no name, or none inside the string table
                continue
            out.append((value, size, strtab[name_at:end].decode("utf-8", "replace"),
                        _BIND_RANK.get(info >> 4, 3)))
            if len(out) >= limit:
                return out
    return out
