"""Churn and faults: many clients connecting, pairing, chatting and leaving every way.

The GitHub issue: twenty clients that keep connecting, pairing, sending three
messages and leaving (BYE, NEXT, close, reset, mid-frame) must not crash the
server, and must leave it as they found it. For each server shape (the
default, ``--relay-threads 2``, ``--workers 2``) this test

1. starts ``chatpair server --max-per-ip 64 -q`` (the limit given explicitly,
   so loopback is counted; ``-q`` logs warnings and errors only);
2. runs a short warm-up churn, waits until the server holds no client
   connection and its descriptor counts are steady, and records the
   *baseline*: open descriptors and VmRSS of the listener and of each worker;
3. runs the churn (``tests/churn_load.py``: 20 client slots in one selector
   loop, each connecting, pairing - mostly in the open lobby, two slots per
   room in a few rooms, a fifth in line mode - exchanging three messages and
   leaving by BYE, NEXT, close, reset or a close in the middle of a frame; a
   few give up during the handshake). The load checks everything it receives
   against PROTOCOL.md and counts every departure, stall or unexplained close
   as a failure;
4. checks that the listener and workers are the same processes, that the
   server holds no client connection again and that descriptors are back to
   the baseline exactly and RSS within 1 % of it;
5. opens 64 loopback connections that all complete their handshake (a 65th is
   refused with ``too_many_connections``: the limit is in force, and no count
   leaked), closes them, and then needs a new honest pair to be paired and to
   exchange a message both ways within 1 s;
6. stops the server (exit code 0) and finds nothing at WARNING or above, and
   no traceback, in its log.

``CHATPAIR_CHURN_SECONDS`` sets the churn per shape (default 5; the issue's
acceptance run uses 30). ``CHATPAIR_CHURN_WARMUP`` sets the warm-up (1.5 s).

Nothing sleeps to wait for an event: reads have deadlines, and the only sleeps
are short pauses inside loops that poll /proc.
"""

from __future__ import annotations

import os
import re
import time
from collections import Counter
from typing import Any, Callable

import pytest

from churn_load import run_load
from conftest import ServerProcess, pid_alive, spawned_children
from wire import ERROR, MSG, Client, Closed, Timeout

SECONDS = float(os.environ.get("CHATPAIR_CHURN_SECONDS", "5"))
WARMUP = float(os.environ.get("CHATPAIR_CHURN_WARMUP", "1.5"))
CLIENTS = 20
MAX_PER_IP = 64
#: RSS may end at most this much above the baseline (a fraction of it).
RSS_TOLERANCE = 0.01
#: How long the server gets to close everything once the load has stopped.
SETTLE_SECONDS = 15.0
#: The honest pair after the churn: paired and a message each way within this.
HONEST_WITHIN = 1.0

SHAPES = [
    pytest.param([], id="default"),
    pytest.param(["--relay-threads", "2"], id="relay-threads-2"),
    pytest.param(["--workers", "2"], id="workers-2"),
]

#: A log line the server may print under -q... none: INFO and DEBUG lines only
#: appear with -v, and they are fine; anything else (WARNING and above, a
#: traceback, text from a dying process) is a problem.
_FINE_LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d (INFO|DEBUG) ")

_TCP_STATES = {
    "01": "ESTABLISHED", "02": "SYN_SENT", "03": "SYN_RECV", "04": "FIN_WAIT1", "05": "FIN_WAIT2",
    "06": "TIME_WAIT", "07": "CLOSE", "08": "CLOSE_WAIT", "09": "LAST_ACK", "0A": "LISTEN", "0B": "CLOSING",
}


# -- /proc readings -----------------------------------------------------------------------


def fd_targets(pid: int) -> list[str]:
    """What each open descriptor of ``pid`` points at (``socket:[123]``, ``pipe:[45]``, a path)."""
    out = []
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return out
    for name in names:
        try:
            out.append(os.readlink(f"/proc/{pid}/fd/{name}"))
        except OSError:
            continue  # closed while we looked
    return out


def rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def tcp_connections(port: int) -> dict[str, str]:
    """``socket:[inode]`` -> TCP state of every connection whose local port is ``port``."""
    out = {}
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path) as fh:
                next(fh)
                for line in fh:
                    parts = line.split()
                    if int(parts[1].rsplit(":", 1)[1], 16) != port or parts[3] == "0A":
                        continue
                    out[f"socket:[{parts[9]}]"] = _TCP_STATES.get(parts[3], parts[3])
        except OSError:
            continue
    return out


class Snapshot:
    """Descriptors and RSS of the server's processes, and the client connections they hold."""

    def __init__(self, pids: list[int], port: int) -> None:
        conns = tcp_connections(port)
        self.targets = {pid: fd_targets(pid) for pid in pids}
        self.fds = {pid: len(t) for pid, t in self.targets.items()}
        self.rss = {pid: rss_bytes(pid) for pid in pids}
        #: client connections (by TCP state) still open in a server process
        self.held: Counter[str] = Counter(
            conns[t] for targets in self.targets.values() for t in targets if t in conns)
        self._conns = conns

    def kinds(self, pid: int) -> Counter[str]:
        """Descriptors of ``pid`` by kind (client connections by TCP state)."""
        out: Counter[str] = Counter()
        for t in self.targets[pid]:
            if t in self._conns:
                out[f"client connection ({self._conns[t]})"] += 1
            elif t.startswith("socket:"):
                out["other socket (not a live TCP connection on the port)"] += 1
            else:
                out[re.sub(r"\[\d+\]$", "", t)] += 1
        return out


def poll_until(pred: Callable[[], Any], timeout: float, poll: float = 0.1) -> Any:
    """Poll ``pred`` (a /proc reading) until it is truthy or the time is up; return its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(poll)


# -- reporting -----------------------------------------------------------------------------------


def log_problems(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip() and not _FINE_LOG_LINE.match(line)]


def load_summary(result: dict[str, Any]) -> str:
    stats = result["stats"]
    keys = ("connections", "pairings", "chats", "msgs_sent", "msgs_received", "undelivered", "room_full",
            "pair_wait_expired", "leave_bye", "leave_next", "leave_close", "leave_reset", "leave_midframe",
            "load_errors")
    return ", ".join(f"{k} {stats.get(k, 0)}" for k in keys) + f" in {result['elapsed']:.1f}s"


class Report:
    """Context for every assertion message: what the load saw and what the server logged."""

    def __init__(self, srv: ServerProcess, shape: list[str]) -> None:
        self.srv = srv
        self.shape = shape
        self.loads: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, headline: str) -> str:
        """The message for a failed check. Stops the server first, so that its whole log is in."""
        stop_note = ""
        if self.srv.proc.poll() is None:
            try:
                code = self.srv.stop()
                stop_note = f" (stopped for this report: exit code {code})"
            except AssertionError as exc:
                stop_note = f" (stopping it for this report failed: {exc})"
            finally:
                self.srv.kill()
        lines = [headline, "",
                 f"server: chatpair server --max-per-ip {MAX_PER_IP} -q {' '.join(self.shape)}{stop_note}"]
        for name, result in self.loads:
            lines.append(f"{name}: {load_summary(result)}")
            kinds = result["failure_kinds"]
            if kinds:
                lines.append(f"  failures: {kinds}")
                lines.extend("    " + f for f in result["failures"][:25])
        problems = log_problems(self.srv.stderr())
        lines.append(f"server log: {len(problems)} line(s) at WARNING or above, or not log lines")
        lines.extend("    " + p for p in problems[:40])
        return "\n".join(lines)


# -- the test ------------------------------------------------------------------------------------


def server_pids(srv: ServerProcess, workers: int) -> list[int]:
    listener = srv.listener()
    kids = poll_until(lambda: len(spawned_children(listener)) == workers and spawned_children(listener), 10,
                      poll=0.02) if workers else []
    assert workers == 0 or (kids and len(kids) == workers), \
        f"expected {workers} relay worker processes under the listener, found {spawned_children(listener)}"
    return [listener, *sorted(kids)]


def describe(pids: list[int], base: Snapshot, now: Snapshot) -> str:
    lines = []
    for i, pid in enumerate(pids):
        what = "listener" if i == 0 else f"worker {i - 1}"
        grew = now.kinds(pid) - base.kinds(pid)
        shrank = base.kinds(pid) - now.kinds(pid)
        lines.append(f"  {what} (pid {pid}): {now.fds[pid]} descriptors (baseline {base.fds[pid]})"
                     + (f"; more: {dict(grew)}" if grew else "") + (f"; fewer: {dict(shrank)}" if shrank else "")
                     + f"; RSS {now.rss[pid] / 1024:.0f} KiB (baseline {base.rss[pid] / 1024:.0f} KiB,"
                     f" {100.0 * (now.rss[pid] - base.rss[pid]) / max(1, base.rss[pid]):+.2f} %)")
    if now.held:
        lines.append(f"  client connections still open in the server: {dict(now.held)}")
    return "\n".join(lines)


def join_room(port: int, name: str, room: str, timeout: float) -> Client:
    c = Client(port, timeout=timeout)
    try:
        c.join(name, room)
    except BaseException:
        c.close()
        raise
    return c


def honest_pair(port: int) -> tuple[float, str]:
    """Two new clients pair and exchange a message each way: (seconds it took, "" or what went wrong)."""
    t0 = time.monotonic()
    a = b = None
    try:
        a = Client(port, timeout=5)
        a.join("honest_a")
        b = Client(port, timeout=5)
        b.join("honest_b")
        a.expect_paired("honest_b")
        b.expect_paired("honest_a")
        a.send_frame(MSG, b"hello from a")
        assert b.expect(MSG) == b"hello from a"
        b.send_frame(MSG, b"hello from b")
        assert a.expect(MSG) == b"hello from b"
        return time.monotonic() - t0, ""
    except (AssertionError, Closed, Timeout, OSError) as exc:
        return time.monotonic() - t0, f"{type(exc).__name__}: {exc}"
    finally:
        for c in (a, b):
            if c is not None:
                c.close()


@pytest.mark.timeout(int(100 + 1.5 * (SECONDS + WARMUP)))
@pytest.mark.parametrize("shape", SHAPES)
def test_churn_leaves_the_server_as_it_found_it(start_server, shape: list[str]) -> None:
    srv: ServerProcess = start_server("--max-per-ip", str(MAX_PER_IP), "-q", *shape)
    port = srv.port
    report = Report(srv, shape)
    pids = server_pids(srv, 2 if "--workers" in shape else 0)

    def alive_and_same() -> None:
        listeners = spawned_children(srv.proc.pid)
        now = listeners + sorted(kid for pid in listeners for kid in spawned_children(pid))
        assert now == pids and all(pid_alive(p) for p in pids), \
            report(f"the server's processes changed: {pids} (listener first) are now {now}")

    # 1. Warm-up churn, then the baseline once the server has closed everything.
    warm = run_load(port, CLIENTS, WARMUP, tag="w", seed=1)
    report.loads.append(("warm-up", warm))
    assert not warm["failure_kinds"], report("the warm-up churn already failed")
    assert warm["stats"].get("pairings", 0) >= 10, report("the warm-up churn did (almost) nothing")
    alive_and_same()
    stable: list[Snapshot] = []

    def settled() -> Snapshot | None:
        snap = Snapshot(pids, port)
        stable.append(snap)
        # no client connection left, and the same descriptor counts for the last 0.5 s
        recent = [s for s in stable[-6:] if not s.held]
        if len(recent) == 6 and all(s.fds == snap.fds for s in recent):
            return snap
        return None

    base = poll_until(settled, SETTLE_SECONDS)
    assert base is not None, report(
        f"{SETTLE_SECONDS:g}s after the warm-up the server has not settled:\n"
        + describe(pids, stable[0], stable[-1]))

    # 2. The churn.
    t0 = time.monotonic()
    churn = run_load(port, CLIENTS, SECONDS, tag="c", seed=2)
    report.loads.append(("churn", churn))
    churn_time = time.monotonic() - t0
    stats = churn["stats"]
    assert not churn["failure_kinds"], report("the churn load saw the server fail")
    problems = log_problems(srv.stderr())
    assert not problems, report("the server logged problems during the churn")
    alive_and_same()
    # Not vacuous: the load did churn, and left every way.
    assert stats.get("pairings", 0) >= 20 and all(stats.get(f"leave_{k}", 0) for k in
                                                   ("bye", "next", "close", "reset", "midframe")), \
        report("the churn did too little to mean anything")

    # 3. Descriptors back to the baseline exactly, RSS within 1 % of it.
    last: list[Snapshot] = []

    def back_to_baseline() -> bool:
        snap = Snapshot(pids, port)
        last[:] = [snap]
        return not snap.held and snap.fds == base.fds and all(
            snap.rss[p] <= base.rss[p] * (1 + RSS_TOLERANCE) for p in pids)

    t1 = time.monotonic()
    ok = poll_until(back_to_baseline, SETTLE_SECONDS)
    settle_time = time.monotonic() - t1
    assert ok, report(f"{SETTLE_SECONDS:g}s after the churn the server is not back to its baseline "
                      f"(descriptors exactly, RSS within {100 * RSS_TOLERANCE:g} %):\n"
                      + describe(pids, base, last[0]))

    # 4. Per-IP counts: 64 loopback connections complete their handshake; a 65th is refused.
    clients: list[Client] = []
    try:
        for i in range(MAX_PER_IP):
            try:
                clients.append(join_room(port, f"ip{i}", f"ip{i}", timeout=5))
            except (AssertionError, Closed, Timeout, OSError) as exc:
                raise AssertionError(report(
                    f"per-IP count leaked: loopback connection {i + 1} of {MAX_PER_IP} (the limit) did not "
                    f"complete its handshake: {type(exc).__name__}: {exc}")) from None
        extra = Client(port, timeout=5)
        clients.append(extra)
        extra.hello("one_too_many")
        err = extra.expect(ERROR)
        assert err.get("code") == "too_many_connections", \
            report(f"connection {MAX_PER_IP + 1} from loopback was not refused: {err!r}")
    finally:
        for c in clients:
            c.close()
    released = poll_until(lambda: not Snapshot(pids, port).held, SETTLE_SECONDS)
    assert released, report(f"the server still holds client connections {SETTLE_SECONDS:g}s after the "
                            f"{MAX_PER_IP + 1} per-IP clients closed:\n"
                            + describe(pids, base, Snapshot(pids, port)))

    # 5. An honest pair is served at once.
    took, why = honest_pair(port)
    assert not why and took <= HONEST_WITHIN, report(
        f"after the churn a new pair was not served within {HONEST_WITHIN:g}s: "
        + (why if why else f"it took {took:.2f}s"))
    alive_and_same()

    # 6. A clean stop and a clean log.
    code = srv.stop()
    assert code == 0, report(f"the server exited with {code}")
    problems = log_problems(srv.stderr_text)
    assert not problems, report("the server logged problems")
    print(f"\n[{' '.join(shape) or 'default'}] churn {churn_time:.1f}s: {load_summary(churn)}; "
          f"back to baseline in {settle_time:.2f}s; "
          + "; ".join(f"pid {p}: {base.fds[p]} fds, RSS {base.rss[p] >> 10} KiB -> {last[0].rss[p] >> 10} KiB"
                      for p in pids)
          + f"; honest pair in {took * 1000:.0f} ms")
