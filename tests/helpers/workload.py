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

CHAIN_SOURCE = r"""
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

__attribute__((noinline)) unsigned long leaf(unsigned long n) {
    volatile unsigned long frame[4];
    frame[0] = n;
    for (unsigned long i = 0; i < 200000; i++) frame[0] = frame[0] * 6364136223846793005UL + i;
    return frame[0];
}

__attribute__((noinline)) unsigned long middle(unsigned long n) {
    volatile unsigned long frame[4];
    frame[1] = leaf(n) + leaf(n + 1) + leaf(n + 2);
    return frame[1];
}

__attribute__((noinline)) unsigned long outer(unsigned long n) {
    volatile unsigned long frame[4];
    frame[2] = middle(n) ^ middle(n * 3);
    return frame[2];
}

int main(int argc, char **argv) {
    /* argv[1]: seconds to run (0 = until killed); argv[2]: busy share in percent. */
    double seconds = argc > 1 ? atof(argv[1]) : 0;
    int busy = argc > 2 ? atoi(argv[2]) : 100;
    double start = now();
    volatile unsigned long sink = 0;
    while (seconds == 0 || now() - start < seconds) {
        double slice = now();
        while (now() - slice < 0.01 * busy / 100.0) sink += outer(sink);
        if (busy < 100) usleep((useconds_t)(10000 * (100 - busy) / 100));
    }
    return (int)(sink & 1);
}
"""

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
