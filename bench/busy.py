"""The bench's Python workload: a small call chain in a loop, counting finished iterations.

argv[1]: seconds to run (0: until SIGTERM or SIGINT). Prints "iterations=N seconds=S cpu=C" at
exit (C: its own CPU seconds), like chain_workload.c, so both are read the same way.
"""

import signal
import sys
import time

stopping = False


def on_signal(_signum, _frame):
    global stopping
    stopping = True


def inner(n: int) -> int:
    total = 0
    for i in range(2000):
        total = (total * 31 + i + n) & 0xFFFFFFFF
    return total


def middle(n: int) -> int:
    return inner(n) ^ inner(n + 1)


def outer(n: int) -> int:
    return middle(n) + middle(n * 3)


def main() -> None:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 0.0
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    start = time.monotonic()
    iterations = sink = 0
    while not stopping:
        sink ^= outer(iterations)
        iterations += 1
        if seconds and time.monotonic() - start >= seconds:
            break
    print(f"iterations={iterations} seconds={time.monotonic() - start:.6f} "
          f"cpu={time.process_time():.6f}", flush=True)


if __name__ == "__main__":
    main()
