"""Builds pprof profiles (profile.proto, gzipped) from symbolized stacks.

Samples arrive as Python tuples and are merged in dicts; protobuf messages are made once, in
``build``, from the merged tables: making messages per sample would cost more than the merging.
Every location keeps its runtime address and mapping, symbolized or not, so that a store can
re-symbolize from the mapping's build id.

One builder can serve a target window after window (``new_window``): its tables (mappings,
locations, functions, strings) only grow, and their encoding is kept and reused while they do
not change. A profile is then that encoding followed by the encoded samples of its window: a
protobuf message's encoding may be split anywhere between fields and concatenated, and parsers
append repeated fields (pprof's own reader, upb and every other conforming one), so the result
is one Profile. Most windows of a steady target add no location, and building its profile
costs its samples only.
"""

from __future__ import annotations

import gzip
import itertools
import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass

import services.proto_gen  # noqa: F401  (puts the generated packages on sys.path)
from pprof import profile_pb2

KERNEL_MAPPING = "[kernel.kallsyms]"
PAGE = 4096
U64_MAX = (1 << 64) - 1
# Level 1: on a 50,000-stack profile it took half the time of level 6 for a 2% larger file.
GZIP_LEVEL = 1
# Below this many bytes a profile is stored in its gzip member, not deflated: deflate's set-up
# (allocating and clearing ~256 KB of state) costs ~25-80 us whatever the input, a third of
# building a small target's profile, to save a few hundred bytes. Busy hosts send hundreds of
# such profiles a window (a process with a few samples each).
STORE_BELOW = 8192
MAX_KEPT_LABELS = 4096  # label sets whose Label dicts a builder keeps from window to window
_GZIP_HEADER = bytes((0x1F, 0x8B, 8, 0, 0, 0, 0, 0, 0, 255))  # deflate, no name, mtime 0


def gzip_bytes(data: bytes) -> bytes:
    """One gzip member holding ``data``: deflated at GZIP_LEVEL, or, when it is shorter than
    STORE_BELOW (itself below a stored block's 65,535-byte limit), as one stored block (RFC 1951
    section 3.2.4)."""
    if len(data) >= STORE_BELOW:
        return gzip.compress(data, compresslevel=GZIP_LEVEL, mtime=0)
    # The final block's header (BFINAL=1, BTYPE=00, padded to the byte), LEN and NLEN.
    n = len(data)
    return b"".join((_GZIP_HEADER, struct.pack("<BHH", 1, n, n ^ 0xFFFF), data,
                     struct.pack("<II", zlib.crc32(data), n)))


@dataclass(frozen=True)
class MappingInfo:
    """A mapped file of a process, as in /proc/<pid>/maps (limit is exclusive)."""
    start: int
    limit: int
    offset: int
    path: str
    build_id: str  # hex, or "" when the file has none


@dataclass(frozen=True)
class Frame:
    """What symbolization found for one address; a None function means unknown."""
    function: str | None
    file: str = ""
    line: int = 0


UserFrame = tuple[MappingInfo | None, int, Frame | None]
LabelKey = tuple[tuple[str, str | int], ...]


class ProfileBuilder:
    """Collects the samples of one target and window; ``build`` returns the gzipped profile."""

    def __init__(self, period_ns: int, time_ns: int, duration_ns: int):
        self.period_ns = period_ns
        self.time_ns = time_ns
        self.duration_ns = duration_ns
        self._strings: dict[str, int] = {"": 0}
        # mapping index -> MappingInfo (index 0: no mapping); ids are index, so they count from 1.
        self._mappings: list[MappingInfo | None] = [None]
        self._mapping_index: dict[MappingInfo, int] = {}
        # Every MappingInfo object seen stays referenced here, so that its id() stays unique
        # while _fast_location_ids uses it.
        self._mapping_objects: dict[int, MappingInfo | None] = {}
        # id(mapping) -> (mapping index, that mapping's address -> location id)
        self._index_by_id: dict[int, tuple[int, dict[int, int]]] = {}
        self._kernel_index = 0
        self._kernel_low = self._kernel_high = 0
        self._named_mappings: set[int] = set()
        self._files_mappings: set[int] = set()
        self._lines_mappings: set[int] = set()
        # Locations are columns (mapping index, address, function id or 0, line) rather than
        # rows: a window's build makes hundreds of thousands, and a tuple each would be as many
        # objects to allocate, free and have the garbage collector walk. Ids count from 1.
        self._location_ids: dict[int, dict[int, int]] = {}  # mapping index -> address -> id
        self._fast_location_ids: dict[tuple[int, int], int] = {}  # (id(mapping), address)
        self._kernel_location_ids: dict[int, int] = {}  # address
        self._location_mapping: list[int] = []
        self._location_address: list[int] = []
        self._location_function: list[int] = []
        self._location_line: list[int] = []
        self._function_ids: dict[tuple[str, str], int] = {}
        self._functions: list[tuple[int, int]] = []  # (name index, file index)
        self._samples: dict[tuple[tuple[int, ...], LabelKey], int] = {}
        self._batches: list[tuple[list[tuple[int, ...]], list[LabelKey], list[int]]] = []
        self._sample_total = 0
        self._label_messages: dict[LabelKey, list[dict[str, int]]] = {}
        # The encoded tables, and the table sizes they were encoded at: the tables only grow,
        # so equal sizes mean equal tables. Locations, functions and strings are repeated
        # fields that only grow, so their encoding grows by the new entries' (_grown, with the
        # counts encoded so far); the head (sample types, period, mappings, whose flags and
        # kernel range change in place) is encoded again when it changes.
        self._tables: bytes = b""
        self._tables_version: tuple | None = None
        self._head = b""
        self._head_version: tuple | None = None
        self._grown = b""
        self._grown_counts = (0, 0, 0)  # locations, functions, strings

    def new_window(self, time_ns: int, duration_ns: int) -> None:
        """Drop the samples (not the tables) and start the profile of another window."""
        self.time_ns = time_ns
        self.duration_ns = duration_ns
        self._samples = {}
        self._batches = []
        self._sample_total = 0

    @property
    def location_count(self) -> int:
        return len(self._location_address)

    @property
    def sample_count(self) -> int:
        """Samples added so far (the sum of counts, not the number of distinct stacks)."""
        return self._sample_total

    def add_sample(self, user: list[UserFrame], kernel: list[tuple[int, str]], count: int,
                   labels: dict[str, str | int]) -> None:
        """user: innermost-first (mapping, runtime address, frame); kernel: innermost-first
        (address, function name). The pprof sample's location list is kernel frames first
        (innermost), then user frames."""
        # Fast path: one dict lookup per frame, keyed by the identity of the mapping object
        # (callers pass the same MappingInfo objects again and again, and hashing a frozen
        # dataclass rebuilds a tuple every time). Misses resolve by value in _resolve.
        kernel_ids = [self._kernel_location_ids.get(a) for a, _ in kernel]
        fast = self._fast_location_ids.get
        user_ids = [fast((id(m), a)) for m, a, _ in user]
        if None in kernel_ids:
            # kernel_location, not _add_kernel_location: a recursion repeats an address
            kernel_ids = [lid or self.kernel_location(a, name)
                          for lid, (a, name) in zip(kernel_ids, kernel)]
        if None in user_ids:
            user_ids = [lid or self._resolve(*frame) for lid, frame in zip(user_ids, user)]
        ids = kernel_ids + user_ids
        key = (tuple(ids), tuple(sorted(labels.items())) if labels else ())
        samples = self._samples
        samples[key] = samples.get(key, 0) + count
        self._sample_total += count

    def mapping_index(self, mapping: MappingInfo | None) -> int:
        """The mapping id for ``location`` (0: no mapping); equal mappings share one."""
        if mapping is None:
            return 0
        index = self._mapping_index.get(mapping)
        if index is None:
            index = self._mapping_index[mapping] = len(self._mappings)
            self._mappings.append(mapping)
        return index

    def user_locations(self, addresses: Iterable[int], mappings: Iterable[MappingInfo | None],
                       frames: Iterable[Frame | None]) -> list[int]:
        """The location ids of user frames, each made on first use: runtime addresses, and for
        each its mapping (or None) and frame (or None)."""
        index_of = self._index_by_id
        function = self._function
        add_mapping = self._location_mapping.append
        add_address = self._location_address.append
        add_function = self._location_function.append
        add_line = self._location_line.append
        location_function = self._location_function
        out = []
        for address, mapping, frame in zip(addresses, mappings, frames):
            known = index_of.get(id(mapping))
            if known is None:
                self._mapping_objects[id(mapping)] = mapping  # keeps its id() unique
                index = self.mapping_index(mapping)
                known = index_of[id(mapping)] = (index, self._location_ids.setdefault(index, {}))
            index, ids = known
            lid = ids.get(address)
            if lid is None or (not location_function[lid - 1] and frame is not None
                               and frame.function is not None):
                # New, or named now but not when it was made (its file was unreadable then,
                # in an earlier window): a new location; the old one stays, unused.
                function_id = line = 0
                if frame is not None and frame.function is not None:
                    function_id = function(frame.function, frame.file)
                    line = frame.line
                    if index:
                        self._named_mappings.add(index)
                        if frame.file:
                            self._files_mappings.add(index)
                        if line:
                            self._lines_mappings.add(index)
                add_mapping(index)
                add_address(address)
                add_function(function_id)
                add_line(line)
                lid = ids[address] = len(self._location_address)
            out.append(lid)
        return out

    @property
    def kernel_location_ids(self) -> dict[int, int]:
        """address -> location id of the kernel frames so far (read only: for map())."""
        return self._kernel_location_ids

    def kernel_location(self, address: int, name: str) -> int:
        """The location id of one kernel frame (made on first use)."""
        lid = self._kernel_location_ids.get(address)
        return self._add_kernel_location(address, name) if lid is None else lid

    def add_location_ids(self, ids: tuple[int, ...], count: int, label_key: LabelKey) -> None:
        """A sample by location ids (from user_location and kernel_location, innermost
        first, kernel frames before user frames); label_key: the labels' items, sorted."""
        key = (ids, label_key)
        samples = self._samples
        samples[key] = samples.get(key, 0) + count
        self._sample_total += count

    def add_many(self, location_ids: Iterable[tuple[int, ...]], counts: list[int],
                 label_names: tuple[str, ...], label_values: list[tuple[str | int, ...]]) -> None:
        """Samples by location ids (as add_location_ids), one per count; each sample's labels
        are ``label_names`` with its tuple of ``label_values``. Not merged with each other or
        with other samples: callers pass distinct samples, and pprof readers add up samples
        of equal stacks and labels anyway."""
        label_keys = {values: tuple(sorted(zip(label_names, values)))
                      for values in dict.fromkeys(label_values)}
        self._batches.append((list(location_ids), list(map(label_keys.__getitem__, label_values)),
                              counts))
        self._sample_total += sum(counts)

    def build(self) -> bytes:
        """The gzipped serialized Profile of the samples added since the last ``new_window``."""
        profile = profile_pb2.Profile()
        profile.time_nanos = self.time_ns
        profile.duration_nanos = self.duration_ns
        period = self.period_ns
        # Kept across windows with the string table they index (a target's threads come back
        # window after window); emptied past a bound, as threads come and go.
        label_messages = self._label_messages
        if len(label_messages) > MAX_KEPT_LABELS:
            label_messages.clear()
        labels = self._labels
        add_sample = profile.sample.add
        for (ids, label_key), count in self._samples.items():
            label = label_messages.get(label_key)
            if label is None:
                label = label_messages[label_key] = labels(label_key)
            add_sample(location_id=ids, value=(count, count * period), label=label)
        for location_ids, label_keys, counts in self._batches:
            for label_key in dict.fromkeys(label_keys):
                if label_key not in label_messages:
                    label_messages[label_key] = labels(label_key)
            for ids, label, count in zip(location_ids, map(label_messages.__getitem__, label_keys),
                                         counts):
                add_sample(location_id=ids, value=(count, count * period), label=label)
        # The tables last: the labels above may have added strings.
        return gzip_bytes(self._encoded_tables() + profile.SerializeToString())

    def _version(self) -> tuple:
        return (len(self._strings), len(self._location_address), len(self._functions),
                len(self._mappings), self._kernel_low, self._kernel_high)

    def _mappings_version(self) -> tuple:
        return (len(self._mappings), self._kernel_low, self._kernel_high,
                len(self._named_mappings), len(self._files_mappings), len(self._lines_mappings))

    def _encoded_tables(self) -> bytes:
        """Everything but the samples and the window's time, encoded; kept while unchanged."""
        if self._version() == self._tables_version:
            return self._tables
        string = self._string
        if self._mappings_version() != self._head_version:
            head = profile_pb2.Profile()
            for kind, unit in (("samples", "count"), ("cpu", "nanoseconds")):
                head.sample_type.add(type=string(kind), unit=string(unit))
            head.period_type.type = string("cpu")
            head.period_type.unit = string("nanoseconds")
            head.period = self.period_ns
            self._add_mappings(head)
            self._head = head.SerializeToString()
            self._head_version = self._mappings_version()
        # After the head: it may have added strings (mapping file names, build ids).
        locations, functions, strings = self._grown_counts
        grown = profile_pb2.Profile()
        add_location = grown.location.add
        for lid, index, address, function_id, line in zip(
                itertools.count(locations + 1), self._location_mapping[locations:],
                self._location_address[locations:], self._location_function[locations:],
                self._location_line[locations:]):
            location = add_location(id=lid, mapping_id=index, address=address)
            if function_id:  # adding to the new message beats building a Line to copy
                location.line.add(function_id=function_id, line=line)
        add_function = grown.function.add
        for fid, (name, filename) in enumerate(self._functions[functions:], functions + 1):
            add_function(id=fid, name=name, system_name=name, filename=filename)
        # The strings in index order after those encoded before: a parser appends them.
        grown.string_table.extend(itertools.islice(self._strings, strings, None))
        self._grown += grown.SerializeToString()
        self._grown_counts = (len(self._location_address), len(self._functions),
                              len(self._strings))
        self._tables = self._head + self._grown
        self._tables_version = self._version()
        return self._tables

    def _string(self, s: str) -> int:
        index = self._strings.get(s)
        if index is None:
            index = self._strings[s] = len(self._strings)
        return index

    def _resolve(self, mapping: MappingInfo | None, address: int, frame: Frame | None) -> int:
        """The location id of a user frame that missed the identity-keyed fast path."""
        lid = self.user_locations((address,), (mapping,), (frame,))[0]
        self._fast_location_ids[(id(mapping), address)] = lid
        return lid

    def _function(self, name: str, filename: str) -> int:
        key = (name, filename)
        fid = self._function_ids.get(key)
        if fid is None:
            self._functions.append((self._string(name), self._string(filename)))
            fid = self._function_ids[key] = len(self._functions)
        return fid

    def _add_kernel_location(self, address: int, name: str) -> int:
        if not self._kernel_index:
            # The mapping's range is filled in at build time from the addresses seen.
            self._kernel_index = len(self._mappings)
            self._mappings.append(None)
            self._kernel_low = self._kernel_high = address
        self._kernel_low = min(self._kernel_low, address)
        self._kernel_high = max(self._kernel_high, address)
        function_id = self._function(name, "") if name else 0
        if function_id:
            self._named_mappings.add(self._kernel_index)
        self._location_mapping.append(self._kernel_index)
        self._location_address.append(address)
        self._location_function.append(function_id)
        self._location_line.append(0)
        lid = self._kernel_location_ids[address] = len(self._location_address)
        return lid

    def _add_mappings(self, profile: profile_pb2.Profile) -> None:
        string = self._string
        # pprof reads the first mapping as the main binary: the kernel goes last.
        order = [i for i in range(1, len(self._mappings)) if i != self._kernel_index]
        for index in order + ([self._kernel_index] if self._kernel_index else []):
            mapping = self._mappings[index]
            if index == self._kernel_index:
                # Page-aligned span of the kernel addresses seen: KASLR moves the kernel and
                # its modules, and the profile has no better source for the range.
                start = self._kernel_low & ~(PAGE - 1)
                # The last page's end, but within uint64 (an address in the top page).
                limit = min((self._kernel_high | (PAGE - 1)) + 1, U64_MAX)
                fields = dict(memory_start=start, memory_limit=limit, file_offset=0,
                              filename=string(KERNEL_MAPPING), build_id=0)
            else:
                fields = dict(memory_start=mapping.start, memory_limit=mapping.limit,
                              file_offset=mapping.offset, filename=string(mapping.path),
                              build_id=string(mapping.build_id))
            profile.mapping.add(id=index, has_functions=index in self._named_mappings,
                                has_filenames=index in self._files_mappings,
                                has_line_numbers=index in self._lines_mappings, **fields)

    def _labels(self, label_key: LabelKey) -> list[dict[str, int]]:
        # Dicts, not Label messages: upb makes the sample's labels from dicts faster than it
        # copies messages (0.12 s against 0.15 s for 50,000 samples of two labels).
        string = self._string
        return [{"key": string(key), "num": value} if isinstance(value, int)
                else {"key": string(key), "str": string(value)} for key, value in label_key]
