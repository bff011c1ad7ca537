"""Is this machine's CPU speed steady? One spinning process per CPU, loop rate per second.

On a shared virtual machine a virtual CPU can get faster or slower by 10-15 %
from one second to the next (the host moves it, or a neighbour starts work on
its sibling hyperthread), and a benchmark whose load process takes a whole
core moves with it. Run this for a while before a sitting, or when runs of
one server fall into two groups: a step in one column is the machine, not the
code (docs/performance.md, "the ceiling of the ping-pong ratio").

    python scripts/cpu_steps.py --seconds 60
    cpu 0: 93.2 89.4 86.0 90.3 95.3 95.6 ...  (thousands of 1,000-iteration loops a second)
    cpu 1: 94.8 94.7 94.5 95.1 95.5 93.0 ...

Linux only (it pins each process to its CPU with ``os.sched_setaffinity``).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import time


def spin(cpu: int, seconds: float, results: multiprocessing.SimpleQueue) -> None:  # type: ignore[type-arg]
    """Count 1,000-iteration loops, one figure per second, pinned to ``cpu``."""
    os.sched_setaffinity(0, {cpu})
    rates: list[int] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        second_ends = time.perf_counter() + 1.0
        loops = 0
        while time.perf_counter() < second_ends:
            for _ in range(1000):
                pass
            loops += 1
        rates.append(loops)
    results.put((cpu, rates))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    cpus = sorted(os.sched_getaffinity(0))
    results: multiprocessing.SimpleQueue = multiprocessing.SimpleQueue()  # type: ignore[type-arg]
    procs = [multiprocessing.Process(target=spin, args=(cpu, args.seconds, results)) for cpu in cpus]
    for proc in procs:
        proc.start()
    rows = dict(results.get() for _ in procs)
    for proc in procs:
        proc.join()
    for cpu in cpus:
        print(f"cpu {cpu}: " + " ".join(f"{rate / 1000:.1f}" for rate in rows[cpu]))


if __name__ == "__main__":
    main()
