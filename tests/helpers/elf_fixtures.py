"""Real ELF files for the symbolization tests, built with gcc, g++, objcopy and strip.

Each builder writes into a directory the test owns and returns paths; the expected answers come
from binutils (`nm`, `readelf`), not from the code under test.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from tests.helpers.workload import compile_c

# Functions big enough that a mid-function address is clearly inside them.
C_SOURCE = r"""
#include <stdio.h>
#include <unistd.h>

__attribute__((noinline)) unsigned long alpha(unsigned long n) {
    volatile unsigned long x = n;
    for (int i = 0; i < 100; i++) x = x * 31 + i;
    return x;
}

__attribute__((noinline)) unsigned long beta(unsigned long n) {
    volatile unsigned long y = n;
    for (int i = 0; i < 100; i++) y = y * 17 + alpha(i);
    return y;
}

int main(int argc, char **argv) {
    /* With an argument: print where alpha is, then wait (for reading /proc/<pid>/maps). */
    if (argc > 1) {
        printf("%p\n", (void *)&alpha);
        fflush(stdout);
        pause();
    }
    return (int)(beta((unsigned long)argc) & 1);
}
"""

CXX_SOURCE = r"""
namespace ns {
struct Klass {
    __attribute__((noinline)) int method(int n);
};
int Klass::method(int n) {
    volatile int x = n;
    for (int i = 0; i < 100; i++) x = x * 3 + i;
    return x;
}
}

int main(int argc, char **) {
    ns::Klass k;
    return k.method(argc) & 1;
}
"""

LIB_SOURCE = r"""
#include <stdio.h>

__attribute__((noinline)) unsigned long lib_work(unsigned long n) {
    volatile unsigned long x = n;
    for (int i = 0; i < 100; i++) x = x * 7 + i;
    return x;
}

void lib_report(void) {
    printf("%p\n", (void *)&lib_work);
    fflush(stdout);
}
"""

LIB_MAIN_SOURCE = r"""
#include <unistd.h>
void lib_report(void);
int main(void) {
    lib_report();
    pause();
    return 0;
}
"""

FLAGS = ["-O1", "-g", "-fno-inline"]


def build_c(directory: Path, name: str = "fixture", flags: list[str] | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    return compile_c(C_SOURCE, directory / name, flags or FLAGS)


def build_cxx(directory: Path, name: str = "fixture_cxx") -> Path:
    return compile_c(CXX_SOURCE, directory / name, FLAGS, cc="g++")


def build_shared_library_program(directory: Path) -> tuple[Path, Path]:
    """(program, libfixture.so): the program prints lib_work's runtime address and waits."""
    lib = directory / "libfixture.so"
    # Text at vaddr 0x11000 but file offset 0x1000: runtime address, file offset and vaddr
    # all differ, so the conversion through PT_LOAD is exercised.
    compile_c(LIB_SOURCE, lib, [*FLAGS, "-fPIC", "-shared", "-Wl,-Ttext-segment=0x10000"])
    program = directory / "uselib"
    source = directory / "uselib.c"
    source.write_text(LIB_MAIN_SOURCE)
    # The library must follow the source on the command line (compile_c puts flags first).
    subprocess.run(["gcc", *FLAGS, "-o", str(program), str(source), f"-L{directory}",
                    f"-Wl,-rpath,{directory}", "-lfixture"],
                   check=True, capture_output=True, timeout=60)
    return program, lib


def function_addresses(path: Path) -> dict[str, int]:
    """Defined text symbols by name, from `nm` (the independent answer)."""
    out = subprocess.run(["nm", "--defined-only", str(path)], check=True, capture_output=True,
                         text=True).stdout
    found = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1] in "tTWi":
            found.setdefault(parts[2], int(parts[0], 16))
    return found


def build_id(path: Path) -> str:
    out = subprocess.run(["readelf", "-n", str(path)], check=True, capture_output=True,
                         text=True).stdout
    match = re.search(r"Build ID: ([0-9a-f]+)", out)
    return match.group(1) if match else ""


def split_debug(binary: Path, out_dir: Path, debug_dir: Path | None = None,
                debuglink: bool = False) -> tuple[Path, Path]:
    """Strip a copy of `binary` into out_dir and keep its symbols in a separate debug file.

    With debug_dir, the debug file goes to <debug_dir>/.build-id/xx/rest.debug; with
    debuglink, it goes beside the stripped copy and the copy gets a .gnu_debuglink.
    Returns (stripped, debug file).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    stripped = out_dir / binary.name
    debug = out_dir / (binary.name + ".debug")
    subprocess.run(["objcopy", "--only-keep-debug", str(binary), str(debug)], check=True)
    subprocess.run(["strip", "--strip-all", "-o", str(stripped), str(binary)], check=True)
    if debuglink:
        subprocess.run(["objcopy", f"--add-gnu-debuglink={debug}", str(stripped)], check=True,
                       cwd=out_dir)
    if debug_dir is not None:
        bid = build_id(binary)
        target = debug_dir / ".build-id" / bid[:2] / (bid[2:] + ".debug")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(debug, target)
        debug = target
    return stripped, debug


def truncated_copy(binary: Path, out: Path, keep: int) -> Path:
    out.write_bytes(binary.read_bytes()[:keep])
    return out


def exec_mapping(pid: int, path: Path, runtime_address: int) -> tuple[int, int, int]:
    """(start, limit, offset) of the mapping of `path` in /proc/<pid>/maps holding the address."""
    real = str(path.resolve())
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == real:
            start, limit = (int(x, 16) for x in fields[0].split("-"))
            if start <= runtime_address < limit:
                return start, limit, int(fields[2], 16)
    raise LookupError(f"{real} does not map {runtime_address:#x} in process {pid}")


def executable_segment(path: Path) -> tuple[int, int, int]:
    """(file offset, vaddr, file size) of the R E PT_LOAD segment, from `readelf -lW`."""
    out = subprocess.run(["readelf", "-lW", str(path)], check=True, capture_output=True,
                         text=True).stdout
    for line in out.splitlines():
        fields = line.split()
        if fields[:1] == ["LOAD"] and "E" in fields[6:-1]:
            return int(fields[1], 16), int(fields[2], 16), int(fields[4], 16)
    raise LookupError(f"{path} has no executable segment")
