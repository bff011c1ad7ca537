"""Count the Redis commands a cluster spends per cross-node message and per pair (docs/cluster.md).

Starts a throwaway cluster (``scripts/cluster_up.py``'s :class:`Cluster`: one
redis-server, N nodes on loopback), then for each workload resets Redis's
command statistics (``CONFIG RESETSTAT``), runs ``chatpair bench --target
n0,n1,...`` (client k on node k mod N: every pair is cross-node), reads
``INFO commandstats`` and divides the calls by what the bench delivered.
The cluster's background work (heartbeats, the dead-node watch, reader
trims) is measured alone first, for the same time, and subtracted.

    python scripts/cluster_redis_ops.py --nodes 2
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cluster_up import ROOT, Cluster  # noqa: E402

WORKLOADS = {  # name -> (bench arguments, what to divide by: "messages" or "pairs")
    "flood, 100 pairs": ("-m flood -P 100 --messages 20000", "messages"),
    "ping-pong, 1 pair": ("-m pingpong -P 1 --messages 5000", "messages"),
    "connect+pair": ("-m idle -P 2000 -d 0", "pairs"),
}


def redis_cli(sock: Path, *args: str) -> str:
    return subprocess.run(["redis-cli", "-s", str(sock), *args], capture_output=True, text=True, check=True).stdout


def command_calls(sock: Path) -> dict[str, int]:
    calls = {}
    for line in redis_cli(sock, "INFO", "commandstats").splitlines():
        if line.startswith("cmdstat_"):
            name, _, rest = line[len("cmdstat_"):].partition(":")
            calls[name] = int(rest.split(",")[0].split("=")[1])
    return calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=2)
    args = parser.parse_args()
    cluster = Cluster(args.nodes, False, ["-q"], sys.executable)
    sock = cluster.dir / "redis.sock"
    try:
        time.sleep(1.0)  # let the nodes settle (the first watch, the first trims): nothing to wait on
        redis_cli(sock, "CONFIG", "RESETSTAT")
        time.sleep(5.0)  # the background alone, for a known time
        idle = command_calls(sock)
        per_second = {k: v / 5.0 for k, v in idle.items()}
        print(f"{args.nodes} nodes at rest: {sum(per_second.values()):.1f} commands/s "
              + ", ".join(f"{k} {v:.1f}" for k, v in sorted(per_second.items())))
        for name, (bench_args, unit) in WORKLOADS.items():
            redis_cli(sock, "CONFIG", "RESETSTAT")
            started = time.monotonic()
            out = subprocess.run([sys.executable, "-m", "chatpair", "bench", "--target", cluster.front, "--json",
                                  *shlex.split(bench_args)], cwd=ROOT, capture_output=True, text=True, timeout=600)
            elapsed = time.monotonic() - started
            calls = command_calls(sock)
            result = json.loads(out.stdout)
            per = result["delivered"] if unit == "messages" else result["pairs_connected"]
            work = {k: max(0.0, v - per_second.get(k, 0.0) * elapsed) for k, v in calls.items()}
            total = sum(work.values())
            print(f"{name} ({bench_args}; ok={result['ok']}): {total / per:.3f} commands per {unit[:-1]} "
                  f"({per:,} {unit}) - " + ", ".join(f"{k} {v / per:.3f}" for k, v in sorted(work.items()) if v))
    finally:
        cluster.stop()


if __name__ == "__main__":
    main()
