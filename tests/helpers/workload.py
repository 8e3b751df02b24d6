"""C workloads with a known call chain, compiled by the tests themselves.

The chain is main -> outer -> middle -> leaf, with frame pointers everywhere so that the
kernel's frame-pointer walk sees every frame. gcc leaves the frame pointer out of leaf functions
without a stack frame even with -mno-omit-leaf-frame-pointer (FACTS.md), so each function keeps
a volatile local array.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

FP_FLAGS = ["-O2", "-g", "-fno-omit-frame-pointer", "-mno-omit-leaf-frame-pointer",
            "-fno-optimize-sibling-calls", "-fno-inline"]

# The bench's workload (it also counts its iterations): one C program for tests and bench.
CHAIN_SOURCE = (Path(__file__).resolve().parents[2] / "bench" / "chain_workload.c").read_text()

CHAIN = ["main", "outer", "middle", "leaf"]


def compile_c(source: str, out: Path, flags: list[str] | None = None, cc: str = "gcc") -> Path:
    src = out.with_suffix(".c" if cc == "gcc" else ".cc")
    src.write_text(source)
    cmd = [cc, *(flags if flags is not None else FP_FLAGS), "-o", str(out), str(src)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=60)
    return out


def build_chain_workload(directory: str | os.PathLike | None = None, name: str = "chain") -> Path:
    """Compile the main -> outer -> middle -> leaf workload and return its path."""
    directory = Path(directory or tempfile.mkdtemp(prefix="parca-agent-test-"))
    directory.mkdir(parents=True, exist_ok=True)
    # Unprivileged services must be able to read the binary to symbolize it.
    os.chmod(directory, 0o755)
    return compile_c(CHAIN_SOURCE, directory / name)
