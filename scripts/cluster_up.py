"""Start a throwaway chatpair cluster on loopback: one redis-server, N nodes, optionally HAProxy.

For measuring and trying cluster mode by hand (docs/performance.md,
"Cluster"). Everything runs on 127.0.0.1: redis-server on a Unix socket in a
temporary directory (no persistence), N ``chatpair server --cluster ...
--node-id nK`` nodes on free ports, and with ``--haproxy`` an HAProxy in
front of them (``balance roundrobin``, ``send-proxy-v2``; the nodes then get
``--proxy-protocol``). Once every node has joined the cluster it prints one
line, the way ``chatpair server`` does, so ``scripts/side_by_side.py`` can
start it as a "server":

    listening on 127.0.0.1:P1,127.0.0.1:P2,127.0.0.1:P3     (the nodes)
    listening on 127.0.0.1:P                                 (--haproxy: the balancer)

and then waits. SIGTERM or SIGINT stops it: the nodes first (SIGTERM,
waited for), then HAProxy, then Redis; the temporary directory goes.
Options after ``--`` go to every node.

    python scripts/cluster_up.py --nodes 3 -- -q
    python scripts/cluster_up.py --nodes 3 --haproxy -- -q
    python scripts/side_by_side.py --runs 3 \\
        --server "single=.venv/bin/python -m chatpair server --port 0 -q" \\
        --server "cluster-3=.venv/bin/python scripts/cluster_up.py --nodes 3 -- -q" \\
        --bench "pingpong-1=-m pingpong -P 1 -d 4"

Logs: each node's stderr and HAProxy's output go to files in the temporary
directory (printed on stderr with ``--verbose``), Redis's nowhere.
"""

from __future__ import annotations

import argparse
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def read_until(proc: subprocess.Popen[bytes], marker: bytes, timeout: float) -> bytes:
    """Read ``proc``'s stdout until a line containing ``marker``; that line (SystemExit at the deadline)."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    buf = b""
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while True:
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if marker in line:
                    return line
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                raise SystemExit(f"cluster_up: no {marker!r} from {proc.args!r} within {timeout}s")
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                raise SystemExit(f"cluster_up: {proc.args!r} exited: {buf[-500:]!r}")
            buf += chunk


class Cluster:
    """The processes of one throwaway cluster; :meth:`stop` ends them all."""

    def __init__(self, nodes: int, haproxy: bool, node_args: list[str], python: str, tcp: bool = False) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="chatpair-cluster-"))
        self.procs: list[subprocess.Popen[bytes]] = []
        self.redis: subprocess.Popen[bytes] | None = None
        self.haproxy: subprocess.Popen[bytes] | None = None
        self.ports: list[int] = []
        self.front = ""
        self._logs: list[object] = []
        try:
            self._start(nodes, haproxy, node_args, python, tcp)
        except BaseException:
            self.stop()
            raise

    def _start(self, nodes: int, haproxy: bool, node_args: list[str], python: str, tcp: bool) -> None:
        redis = shutil.which("redis-server") or "/usr/bin/redis-server"
        sock = self.dir / "redis.sock"
        port = free_port() if tcp else 0
        self.redis = subprocess.Popen([redis, "--port", str(port), "--bind", "127.0.0.1", "--unixsocket", str(sock), "--unixsocketperm", "700",
                                       "--save", "", "--appendonly", "no", "--dir", str(self.dir)],
                                      stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        read_until(self.redis, b"eady to accept connections", 10)
        self.redis.stdout.close()  # type: ignore[union-attr]
        url = f"redis://127.0.0.1:{port}/0" if tcp else f"unix://{sock}"
        extra = ["--proxy-protocol"] if haproxy else []
        for i in range(nodes):  # started together, waited for together
            log = open(self.dir / f"n{i}.log", "wb")  # noqa: SIM115 - closed by stop()
            self._logs.append(log)
            self.procs.append(subprocess.Popen(
                [python, "-m", "chatpair", "server", "--host", "127.0.0.1", "--port", "0", "--cluster", url,
                 "--node-id", f"n{i}", *extra, *node_args],
                cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log, start_new_session=True))
        for proc in self.procs:
            line = read_until(proc, b"listening on ", 30)
            self.ports.append(int(line.split()[2].rsplit(b":", 1)[1]))
        self.front = ",".join(f"127.0.0.1:{p}" for p in self.ports)
        if haproxy:
            self._start_haproxy()

    def _start_haproxy(self) -> None:
        port, ready = free_port(), free_port()
        servers = "\n".join(f"    server n{i} 127.0.0.1:{p} send-proxy-v2" for i, p in enumerate(self.ports))
        config = self.dir / "haproxy.cfg"
        config.write_text(f"""\
global
    maxconn 8000
defaults
    mode tcp
    maxconn 8000
    timeout connect 5s
    timeout client 1h
    timeout server 1h
frontend chatpair
    bind 127.0.0.1:{port}
    default_backend nodes
frontend ready
    bind 127.0.0.1:{ready}
    tcp-request connection reject
backend nodes
    balance roundrobin
{servers}
""")
        log = open(self.dir / "haproxy.log", "wb")  # noqa: SIM115 - closed by stop()
        self._logs.append(log)
        haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
        self.haproxy = subprocess.Popen([haproxy, "-db", "-f", str(config)], stdin=subprocess.DEVNULL,
                                        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 10
        while True:
            if self.haproxy.poll() is not None:
                raise SystemExit(f"cluster_up: haproxy exited: {(self.dir / 'haproxy.log').read_text()[-500:]}")
            try:
                socket.create_connection(("127.0.0.1", ready), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit("cluster_up: haproxy did not listen within 10s") from None
                time.sleep(0.05)  # polling a port: nothing to wait on
        self.front = f"127.0.0.1:{port}"

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for proc in (self.haproxy, self.redis):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        for log in self._logs:
            log.close()  # type: ignore[attr-defined]
        shutil.rmtree(self.dir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--haproxy", action="store_true", help="HAProxy in front (round robin, send-proxy-v2)")
    parser.add_argument("--tcp", action="store_true", help="nodes reach Redis over TCP on 127.0.0.1 (default: a Unix socket)")
    parser.add_argument("--python", default=sys.executable, help="the interpreter that runs the nodes")
    parser.add_argument("--verbose", action="store_true", help="say where the logs are")
    parser.add_argument("node_args", nargs="*", help="options for every node (after --)")
    args = parser.parse_args()
    stop = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    # Each child has a session of its own, so a signal to our process group
    # (side_by_side.py sends one) reaches only us, and stop() ends them in order.
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    cluster = Cluster(args.nodes, args.haproxy, args.node_args, args.python, args.tcp)
    try:
        if args.verbose:
            print(f"cluster_up: logs in {cluster.dir}", file=sys.stderr)
        print(f"listening on {cluster.front}", flush=True)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})  # after the children started
        if not stop:  # (a signal before the mask already set it)
            signal.sigwait({signal.SIGTERM, signal.SIGINT})
    finally:
        cluster.stop()


if __name__ == "__main__":
    main()
