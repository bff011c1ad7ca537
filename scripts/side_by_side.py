"""Measure servers side by side in one sitting: alternating runs, medians, ratios.

These machines are shared and vary several-fold from day to day, so a speed
claim here is a ratio measured in one sitting. This script starts each
server fresh for every run (so memory figures start clean), drives it with
the same ``chatpair bench --target`` command, alternates which server goes
first, and prints the median, the spread and the ratio to the first server.

    python scripts/side_by_side.py --runs 5 \\
        --server "old=cd /tmp/old && /work/main/.venv/bin/python -m chatpair server --port 0 -q" \\
        --server "new=.venv/bin/python -m chatpair server --port 0 -q" \\
        --bench "pingpong-100=-m pingpong -P 100 -d 5 --procs 1" \\
        --bench "idle-9900=-m idle -P 9900"

A server command must print ``listening on HOST:PORT`` on stdout (chatpair
and scripts/uvloop_relay.py both do), or ``listening on H1:P1,H2:P2,...``
for several servers driven as one (``scripts/cluster_up.py``: the nodes of
a cluster; then the bench gets that list as ``--target`` and samples no
server's memory). The bench is this checkout's
``python -m chatpair bench``; ``--bench-python`` picks another interpreter.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time

METRICS = (  # (key, label, better) - better: "high" or "low"
    ("msgs_per_s", "msg/s", "high"),
    ("latency.p50", "p50 us", "low"),
    ("latency.p99", "p99 us", "low"),
    ("pairs_per_s", "pairs/s", "high"),
    ("memory_per_pair", "B/pair", "low"),
)


def start_server(command: str) -> tuple[subprocess.Popen[bytes], str]:
    # exec the server itself (after any "cd DIR &&"), so its pid is the server's.
    prefix, sep, last = command.rpartition("&&")
    shell = f"{prefix}{sep} exec {last.strip()}" if sep else f"exec {command}"
    proc = subprocess.Popen(["sh", "-c", shell], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    assert proc.stdout is not None
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        line = proc.stdout.readline().decode()
        if line.startswith("listening on "):
            targets = line.split()[2]
            if "," in targets:
                return proc, targets
            return proc, f"127.0.0.1:{targets.rsplit(':', 1)[1]}"
        if not line:
            break
    stop_server(proc)
    raise SystemExit(f"server did not start: {command}")


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(15)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def run_bench(python: str, target: str, pid: int, args: str) -> dict:
    sample = [] if "," in target else ["--server-pid", str(pid)]
    cmd = [python, "-m", "chatpair", "bench", "--target", target, *sample, "--json", *shlex.split(args)]
    out = subprocess.run(cmd, capture_output=True, timeout=900)
    try:
        result = json.loads(out.stdout)
    except json.JSONDecodeError:
        raise SystemExit(f"bench failed: {' '.join(cmd)}\n{out.stderr.decode()[-2000:]}") from None
    if not result.get("ok") or result.get("lost") or result.get("out_of_order"):
        print(f"  ! run not clean: lost={result.get('lost')} out_of_order={result.get('out_of_order')} "
              f"failures={result.get('failures')}", file=sys.stderr)
    return result


def metric(result: dict, key: str) -> float | None:
    value: object = result
    for part in key.split("."):
        if not isinstance(value, dict) or value.get(part) is None:
            return None
        value = value[part]
    number = float(value)  # type: ignore[arg-type]
    return number / 1000 if key.startswith("latency.") else number


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", action="append", required=True, help="NAME=shell command")
    parser.add_argument("--bench", action="append", required=True, help="NAME=chatpair bench arguments")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--bench-python", default=sys.executable)
    parser.add_argument("--interleave", action="store_true",
                        help="alternate the benches too (run 1: A B, run 2: B A, ...), to compare bench "
                             "options (e.g. with and without --resume) against the same server")
    args = parser.parse_args()
    servers = [tuple(s.split("=", 1)) for s in args.server]
    benches = [tuple(b.split("=", 1)) for b in args.bench]
    every: dict[tuple[str, str], list[dict]] = {(b, s): [] for b, _ in benches for s, _ in servers}
    if args.interleave:
        for run in range(args.runs):
            for bench_name, bench_args in (benches if run % 2 == 0 else benches[::-1]):
                for name, command in (servers if run % 2 == 0 else servers[::-1]):
                    proc, port = start_server(command)
                    try:
                        every[bench_name, name].append(run_bench(args.bench_python, port, proc.pid, bench_args))
                    finally:
                        stop_server(proc)
    for bench_name, bench_args in benches:
        samples: dict[str, list[dict]] = {name: every[bench_name, name] for name, _ in servers}
        for run in range(0 if args.interleave else args.runs):
            order = servers if run % 2 == 0 else servers[::-1]
            for name, command in order:
                proc, port = start_server(command)
                try:
                    samples[name].append(run_bench(args.bench_python, port, proc.pid, bench_args))
                finally:
                    stop_server(proc)
        print(f"\n{bench_name}: chatpair bench {bench_args}  ({args.runs} runs each, alternating)")
        base = servers[0][0]
        for key, label, _better in METRICS:
            rows = []
            medians = {}
            for name, _ in servers:
                values = [v for v in (metric(r, key) for r in samples[name]) if v is not None]
                if not values:
                    continue
                medians[name] = statistics.median(values)
                rows.append((name, medians[name], min(values), max(values)))
            if len(rows) < len(servers):
                continue
            for name, med, lo, hi in rows:
                ratio = med / medians[base] if medians[base] else float("nan")
                print(f"  {label:>8}  {name:>12}: median {med:>12,.1f}  (min {lo:,.1f}, max {hi:,.1f})"
                      f"  ratio to {base}: {ratio:.2f}")


if __name__ == "__main__":
    main()
