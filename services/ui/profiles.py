"""pprof in the UI: decode, merge windows into one profile, and views for the browser.

Profiles come from the aggregator, but the UI never trusts their shape: ids that point nowhere
and out-of-range string indexes become placeholder names rather than errors, and decompression
is bounded so that a small gzip bomb cannot exhaust memory.
"""

from __future__ import annotations

import gzip
import os
import zlib
from dataclasses import dataclass

import services.proto_gen  # noqa: F401  (puts the generated modules on sys.path)
from pprof import profile_pb2  # noqa: E402

MAX_PROFILE_BYTES = 128 * 1024 * 1024  # decompressed; the wire bounds a compressed frame at 64 MB
# Frames narrower than this share of the total are invisible in any browser, and dropping them
# keeps the flame graph's JSON small for profiles with very many distinct stacks.
MIN_FRAME_SHARE = 1e-4
MAX_DEPTH = 512  # BPF stacks hold at most 127 frames each; also bounds recursion
TOP_ROWS = 500


class ProfileError(ValueError):
    """The bytes are not a usable gzipped pprof; the message is shown in the Error column."""


def decode(gz: bytes) -> profile_pb2.Profile:
    if gz[:2] != b"\x1f\x8b":
        raise ProfileError("pprof is not gzip-compressed")
    inflater = zlib.decompressobj(wbits=31)
    try:
        raw = inflater.decompress(gz, MAX_PROFILE_BYTES)
    except zlib.error as e:
        raise ProfileError(f"pprof does not decompress: {e}") from None
    if inflater.unconsumed_tail:
        raise ProfileError(f"pprof is larger than {MAX_PROFILE_BYTES} bytes uncompressed")
    if not inflater.eof:
        raise ProfileError("pprof does not decompress: the gzip stream is truncated")
    profile = profile_pb2.Profile()
    try:
        profile.ParseFromString(raw)
    except Exception as e:  # protobuf's DecodeError, and others from the C implementation
        raise ProfileError(f"pprof does not parse: {type(e).__name__}") from None
    return profile


def encode(profile: profile_pb2.Profile) -> bytes:
    return gzip.compress(profile.SerializeToString(), compresslevel=6)


def _string(profile: profile_pb2.Profile, index: int) -> str:
    table = profile.string_table
    return table[index] if 0 <= index < len(table) else ""


def _sample_types(profile: profile_pb2.Profile) -> tuple[tuple[str, str], ...]:
    return tuple((_string(profile, t.type), _string(profile, t.unit)) for t in profile.sample_type)


class _Builder:
    """One output profile; every table deduplicated by content, so ids and strings are remapped."""

    def __init__(self) -> None:
        self.out = profile_pb2.Profile()
        self.out.string_table.append("")
        self._strings = {"": 0}
        self._functions: dict[tuple, int] = {}
        self._mappings: dict[tuple, int] = {}
        self._locations: dict[tuple, int] = {}
        self._samples: dict[tuple, profile_pb2.Sample] = {}

    def string(self, text: str) -> int:
        index = self._strings.get(text)
        if index is None:
            index = self._strings[text] = len(self.out.string_table)
            self.out.string_table.append(text)
        return index

    def _intern(self, table: dict, key: tuple, repeated, fill) -> int:
        new_id = table.get(key)
        if new_id is None:
            new_id = table[key] = len(table) + 1
            item = repeated.add()
            fill(item)
            item.id = new_id
        return new_id

    def add(self, p: profile_pb2.Profile) -> None:
        functions, mappings = {}, {}
        for f in p.function:
            key = (_string(p, f.name), _string(p, f.system_name), _string(p, f.filename),
                   f.start_line)

            def fill(n, key=key):
                n.name, n.system_name, n.filename = (self.string(t) for t in key[:3])
                n.start_line = key[3]
            functions[f.id] = self._intern(self._functions, key, self.out.function, fill)
        for m in p.mapping:
            key = (m.memory_start, m.memory_limit, m.file_offset, _string(p, m.filename),
                   _string(p, m.build_id))

            def fill(n, m=m, key=key):
                n.CopyFrom(m)
                n.filename, n.build_id = self.string(key[3]), self.string(key[4])
            mappings[m.id] = self._intern(self._mappings, key, self.out.mapping, fill)
        locations = {}
        for loc in p.location:
            lines = tuple((functions.get(ln.function_id, 0), ln.line) for ln in loc.line)
            key = (mappings.get(loc.mapping_id, 0), loc.address, lines, loc.is_folded)

            def fill(n, key=key):
                n.mapping_id, n.address, n.is_folded = key[0], key[1], key[3]
                for function_id, line in key[2]:
                    n.line.add(function_id=function_id, line=line)
            locations[loc.id] = self._intern(self._locations, key, self.out.location, fill)
        for sample in p.sample:
            loc_ids = tuple(locations.get(i, 0) for i in sample.location_id)
            labels = tuple((_string(p, lb.key), _string(p, lb.str), lb.num, _string(p, lb.num_unit))
                           for lb in sample.label)
            merged = self._samples.get((loc_ids, labels))
            if merged is None:
                merged = self._samples[(loc_ids, labels)] = self.out.sample.add()
                merged.location_id.extend(loc_ids)
                merged.value.extend([0] * len(self.out.sample_type))
                for key, text, num, unit in labels:
                    merged.label.add(key=self.string(key), str=self.string(text), num=num,
                                     num_unit=self.string(unit))
            for i, v in enumerate(sample.value[:len(merged.value)]):
                merged.value[i] += v


def merge(profiles: list[profile_pb2.Profile]) -> profile_pb2.Profile:
    """One profile with the samples of all; profiles whose sample types differ from the first's
    are left out (their values would not add up)."""
    if not profiles:
        raise ProfileError("no profiles to merge")
    if len(profiles) == 1:
        return profiles[0]
    first = profiles[0]
    types = _sample_types(first)
    b = _Builder()
    for name, unit in types:
        b.out.sample_type.add(type=b.string(name), unit=b.string(unit))
    b.out.period_type.type = b.string(_string(first, first.period_type.type))
    b.out.period_type.unit = b.string(_string(first, first.period_type.unit))
    b.out.period = first.period
    start, end = None, None
    for p in profiles:
        if _sample_types(p) != types:
            continue
        b.add(p)
        if p.time_nanos:
            start = p.time_nanos if start is None else min(start, p.time_nanos)
            end = max(end or 0, p.time_nanos + p.duration_nanos)
    if start is not None:
        b.out.time_nanos, b.out.duration_nanos = start, end - start
    return b.out


@dataclass
class ProfileView:
    """What the Show Profile page draws: d3-flame-graph's tree and the top table."""

    sample_type: str
    unit: str
    total: int
    flamegraph: dict
    top: list[dict]


def _frame_names(p: profile_pb2.Profile) -> dict[int, list[tuple[str, str]]]:
    """Location id -> its frames, outermost (caller) first, as (name, library type)."""
    functions = {f.id: _string(p, f.name) or _string(p, f.system_name) for f in p.function}
    mappings = {m.id: _string(p, m.filename) for m in p.mapping}
    frames = {}
    for loc in p.location:
        path = mappings.get(loc.mapping_id, "")
        libtype = "kernel" if path.startswith("[kernel") or path == "vmlinux" else ""
        # A location's lines are innermost first: inlined functions, then the one they sit in.
        names = [functions.get(ln.function_id, "") for ln in reversed(loc.line)]
        names = [n for n in names if n]
        if not names:
            where = os.path.basename(path) or "unknown"
            names = [f"{where} 0x{loc.address:x}"]
        frames[loc.id] = [(n, libtype) for n in names]
    return frames


def view(p: profile_pb2.Profile, sample_index: int = -1) -> ProfileView:
    """Flame graph and top table of one sample type (default: the last, pprof's convention)."""
    types = _sample_types(p)
    if not types:
        return ProfileView("samples", "count", 0, {"name": "all", "value": 0, "children": []}, [])
    sample_index = sample_index % len(types)
    frames = _frame_names(p)
    unknown = [("unknown", "")]
    # Tree nodes as [value, {(name, libtype): child}], built from each stack's outermost frame.
    root: list = [0, {}]
    flat: dict[str, int] = {}
    cum: dict[str, int] = {}
    for sample in p.sample:
        if sample_index >= len(sample.value):
            continue
        value = sample.value[sample_index]
        if value <= 0:
            continue
        stack = []
        for loc_id in reversed(sample.location_id):
            stack.extend(frames.get(loc_id, unknown))
        root[0] += value
        node = root
        for frame in stack[:MAX_DEPTH]:
            node = node[1].setdefault(frame, [0, {}])
            node[0] += value
        if stack:
            flat[stack[-1][0]] = flat.get(stack[-1][0], 0) + value
        for name in {name for name, _ in stack}:
            cum[name] = cum.get(name, 0) + value
    total = root[0]
    threshold = total * MIN_FRAME_SHARE

    def tree(name: str, libtype: str, node: list) -> dict:
        out = {"name": name, "value": node[0]}
        if libtype:
            out["libtype"] = libtype
        children = []
        for (child_name, child_libtype), child in node[1].items():  # a loop: one frame per level
            if child[0] >= threshold:
                children.append(tree(child_name, child_libtype, child))
        if children:
            children.sort(key=lambda c: c["name"])
            out["children"] = children
        return out

    rows = sorted(({"name": n, "flat": flat.get(n, 0), "cum": c} for n, c in cum.items()),
                  key=lambda r: (-r["flat"], -r["cum"], r["name"]))[:TOP_ROWS]
    name, unit = types[sample_index]
    return ProfileView(name, unit, total, tree("all", "", root), rows)
