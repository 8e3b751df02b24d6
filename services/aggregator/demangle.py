"""Symbol names as people read them: C++ (Itanium ``_Z``) and Rust (legacy and v0).

C++ and legacy Rust go through libstdc++'s ``__cxa_demangle`` (the ``cxxfilt`` package). Legacy
Rust names are Itanium-mangled paths ending in a hash component (``17h<16 hex>E``) with ``$..$``
escapes; we drop the hash and undo the escapes. Rust v0 names (``_R``) are not Itanium: binutils'
``c++filt`` knows them, so they are demangled in one batch per call through that program, and
stay mangled where it is missing.
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess

try:
    import cxxfilt
except ImportError:  # the names stay mangled; symbolization still works
    cxxfilt = None

CXXFILT_TIMEOUT = 10.0  # seconds for one batch of v0 names
_RUST_HASH = re.compile(r"::h[0-9a-f]{16}$")
_RUST_ESCAPE = re.compile(r"\$(SP|BP|RF|LT|GT|LP|RP|C|u[0-9a-f]{1,6})\$")
_RUST_ESCAPES = {"SP": "@", "BP": "*", "RF": "&", "LT": "<", "GT": ">", "LP": "(", "RP": ")",
                 "C": ","}


@functools.lru_cache(maxsize=65536)
def demangle(name: str) -> str:
    """The readable form of one name; the name itself when it is not mangled or not valid."""
    if not name.startswith("_Z") or cxxfilt is None:
        return name
    try:
        readable = cxxfilt.demangle(name)
    except Exception:  # cxxfilt raises InvalidName, InternalError or LibraryNotFound
        return name
    if name.startswith("_ZN") and _RUST_HASH.search(readable):
        return _rust_legacy(readable)
    return readable


def demangle_all(names: set[str]) -> dict[str, str]:
    """Readable forms of many names; Rust v0 names share one ``c++filt`` run."""
    out = {n: demangle(n) for n in names if not n.startswith("_R")}
    v0 = sorted(n for n in names if n.startswith("_R"))
    if v0:
        out.update(zip(v0, _cxxfilt_batch(tuple(v0))))
    return out


def _rust_legacy(readable: str) -> str:
    path = _RUST_HASH.sub("", readable)
    parts = []
    for part in path.split("::"):
        # A component may start with "_$" because Itanium names cannot start with "$".
        if part.startswith("_$"):
            part = part[1:]
        part = _RUST_ESCAPE.sub(_unescape, part).replace("..", "::")
        parts.append(part)
    return "::".join(parts)


def _unescape(match: re.Match) -> str:
    code = match.group(1)
    if code.startswith("u"):
        return chr(int(code[1:], 16))
    return _RUST_ESCAPES[code]


@functools.lru_cache(maxsize=4096)
def _cxxfilt_batch(names: tuple[str, ...]) -> list[str]:
    tool = shutil.which("c++filt")
    if tool is None:
        return list(names)
    try:
        done = subprocess.run([tool], input="\n".join(names) + "\n", capture_output=True,
                              text=True, timeout=CXXFILT_TIMEOUT, check=True)
    except (OSError, subprocess.SubprocessError):
        return list(names)
    lines = done.stdout.splitlines()
    return lines if len(lines) == len(names) else list(names)
