"""Kernel function names from /proc/kallsyms, which shows real addresses only to root.

The collector names kernel frames itself and sends the names with each batch, so the
unprivileged aggregator (and any tap subscriber) needs no access to kallsyms.
"""

from __future__ import annotations

import bisect
import time

UNKNOWN = "[unknown]"
RELOAD_AFTER = 60.0  # seconds; modules load and unload, so unknown addresses trigger a re-read


class KernelSymbols:
    def __init__(self, path: str = "/proc/kallsyms"):
        self.path = path
        self._addresses: list[int] = []
        self._names: list[str] = []
        self._cache: dict[int, str] = {}
        self._loaded_at = 0.0
        self.load()

    def load(self) -> None:
        pairs = []
        try:
            with open(self.path, "rb") as fh:
                for line in fh:
                    parts = line.split()
                    if len(parts) < 3 or parts[1] not in b"tTwW":
                        continue  # only text (code) symbols name instruction addresses
                    addr = int(parts[0], 16)
                    if addr == 0:
                        continue  # what a non-root reader sees: useless
                    name = parts[2].decode("ascii", "replace")
                    if len(parts) > 3:
                        name = f"{name} {parts[3].decode('ascii', 'replace')}"  # [module]
                    pairs.append((addr, name))
        except OSError:
            pass
        pairs.sort()
        self._addresses = [a for a, _ in pairs]
        self._names = [n for _, n in pairs]
        self._cache.clear()
        self._loaded_at = time.monotonic()

    def __len__(self) -> int:
        return len(self._addresses)

    def name(self, address: int) -> str:
        cached = self._cache.get(address)
        if cached is not None:
            return cached
        i = bisect.bisect_right(self._addresses, address) - 1
        if i < 0 and time.monotonic() - self._loaded_at > RELOAD_AFTER:
            self.load()
            i = bisect.bisect_right(self._addresses, address) - 1
        name = self._names[i] if i >= 0 else UNKNOWN
        if len(self._cache) > 200_000:
            self._cache.clear()  # bounded; refilled from the sorted table cheaply
        self._cache[address] = name
        return name
