"""Compile and load a BPF program in a short-lived child, and take over its file descriptors.

The child imports BCC (and with it LLVM), compiles, loads the programs into the kernel, sends
the program and map file descriptors over a socket (SCM_RIGHTS) with a JSON description, and
exits; the kernel keeps programs and maps alive through the descriptors in flight. The caller
never maps LLVM: its memory stays that of a small Python process. Nothing is pinned in bpffs, so
when the caller dies the kernel frees everything.

Run as the child: ``python -m services.collector.loader`` with the request on stdin.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass, field

from services.collector.bpf_syscalls import Map, RingSignal

LOAD_TIMEOUT = 120.0  # compiling takes seconds; on a loaded 2-core machine, tens of seconds
MAX_DESCRIPTION = 1 << 20


class LoadError(Exception):
    """The child could not compile or load; the message is its one-line reason."""


@dataclass
class Loaded:
    programs: dict[str, int]  # name -> program fd
    maps: dict[str, Map]
    rings: dict[str, RingSignal] = field(default_factory=dict)  # ring buffers, as wake-ups

    def close(self) -> None:
        for fd in self.programs.values():
            os.close(fd)
        for m in (*self.maps.values(), *self.rings.values()):
            m.close()


def load(source: str, cflags: list[str], programs: list[str], maps: list[str],
         tail_calls: list[tuple[str, int, str]] = (), program_type: str = "PERF_EVENT",
         python: str = sys.executable) -> Loaded:
    """Compile ``source`` in a child and return these programs and maps, by name.

    ``tail_calls``: (program array, index, program) entries the child sets before it hands
    over; keep the program array among ``maps``: the kernel empties a program array when no
    process holds it open any more."""
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    request = json.dumps({"source": source, "cflags": cflags, "programs": programs,
                          "maps": maps, "tail_calls": [list(t) for t in tail_calls],
                          "program_type": program_type, "fd": child.fileno()})
    try:
        proc = subprocess.Popen([python, "-m", "services.collector.loader"],
                                stdin=subprocess.PIPE, stderr=subprocess.PIPE,
                                pass_fds=[child.fileno()])
        child.close()
        try:
            _, err = proc.communicate(request.encode(), timeout=LOAD_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise LoadError(f"compiling the BPF program took over {LOAD_TIMEOUT:.0f} s") from None
        if proc.returncode != 0:
            lines = err.decode("utf-8", "replace").strip().splitlines()
            raise LoadError(lines[-1] if lines else f"the loader exited {proc.returncode}")
        parent.settimeout(5)
        message, fds, _flags, _addr = socket.recv_fds(parent, MAX_DESCRIPTION, 256)
    finally:
        parent.close()
    description = json.loads(message)
    if len(fds) != len(description):
        for fd in fds:
            os.close(fd)
        raise LoadError("the loader sent a description that does not match its descriptors")
    loaded = Loaded(programs={}, maps={})
    for i, (fd, item) in enumerate(zip(fds, description)):
        if item["kind"] == "program":
            loaded.programs[item["name"]] = fd
        elif item["kind"] == "ring":
            try:
                loaded.rings[item["name"]] = RingSignal(fd, item["name"])
            except OSError as e:
                loaded.close()
                for rest in fds[i:]:  # this one and those not wrapped yet
                    os.close(rest)
                raise LoadError(f"cannot map the ring buffer {item['name']}: {e.strerror}") \
                    from None
        else:
            loaded.maps[item["name"]] = Map(fd, item["key_size"], item["value_size"],
                                            item["max_entries"], item["per_cpu"], item["name"])
    return loaded


def _child() -> int:
    request = json.loads(sys.stdin.read())
    sock = socket.socket(fileno=request["fd"])
    import ctypes

    import bcc
    from bcc import table as bcc_table

    try:
        bpf = bcc.BPF(text=request["source"].encode(), cflags=request["cflags"])
    except Exception as e:  # BCC raises bare Exception with the compiler's words
        print(f"BCC could not compile or load the program: {str(e).splitlines()[0]}",
              file=sys.stderr)
        return 1
    kind = getattr(bcc.BPF, request["program_type"])
    description, fds = [], []
    try:
        loaded = {name: bpf.load_func(name.encode(), kind)
                  for name in {*request["programs"], *(t[2] for t in request["tail_calls"])}}
        for array, index, name in request["tail_calls"]:
            bpf[array.encode()][ctypes.c_int(index)] = ctypes.c_int(loaded[name].fd)
    except Exception as e:  # the verifier's refusal comes as a bare Exception too
        print(f"the kernel refused the program: {str(e).splitlines()[0]}", file=sys.stderr)
        return 1
    for name in request["programs"]:
        description.append({"kind": "program", "name": name})
        fds.append(loaded[name].fd)
    for name in request["maps"]:
        t = bpf[name.encode()]
        if isinstance(t, bcc_table.RingBuf):
            description.append({"kind": "ring", "name": name})
            fds.append(t.map_fd)
            continue
        per_cpu = isinstance(t, (bcc_table.PerCpuArray, bcc_table.PerCpuHash,
                                 bcc_table.LruPerCpuHash))
        description.append({"kind": "map", "name": name, "key_size": ctypes.sizeof(t.Key),
                            "value_size": ctypes.sizeof(t.sLeaf if per_cpu else t.Leaf),
                            "max_entries": t.max_entries, "per_cpu": per_cpu})
        fds.append(t.map_fd)
    socket.send_fds(sock, [json.dumps(description).encode()], fds)
    sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(_child())
