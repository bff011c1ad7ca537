"""One bench run: the server, the load processes, the result.

:func:`run_bench` is the whole run as a library call. It starts a server
(:class:`~chatpair.bench.target.LocalServer`) unless given ``--target``,
starts the load processes (:class:`LoadProcesses`), steps them through
their phases (:class:`~chatpair.bench.load.Phase`) while sampling the
server, and adds their reports into a :class:`BenchResult`. The main
process only orchestrates: it never opens a client connection itself.
"""

from __future__ import annotations

import multiprocessing
import secrets
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as mp_wait
from typing import Any

from chatpair.bench.config import BenchConfig
from chatpair.bench.histogram import LogHistogram
from chatpair.bench.load import Phase, load_process_main
from chatpair.bench.load_accounts import LoadReport, LoadSpec
from chatpair.bench.probe import probe_server
from chatpair.bench.result import TICK_NS, BenchResult
from chatpair.bench.target import LocalServer, ServerStats, ServerUnderTest
from chatpair.errors import ChatpairError
from chatpair.netutil import raise_fd_limit

#: ``progress(fraction, label)``: how far the run is, a few times a second.
ProgressFn = Callable[[float, str], None]


class LoadProcesses:
    """The load processes of one run, their pipes and their shared progress array.

    :meth:`start_load_processes` starts them; :meth:`stop_load_processes`
    always stops and joins them (``run_bench`` calls it in ``finally``).
    """

    def __init__(self, cfg: BenchConfig, progress: ProgressFn | None) -> None:
        self.cfg = cfg
        self.progress_fn = progress
        self.ctx = multiprocessing.get_context("spawn")
        self.procs: list[multiprocessing.process.BaseProcess] = []
        self.pipes: list[Connection] = []
        self.shared = self.ctx.RawArray("q", 2 * cfg.procs)  # [progress_count, delivered] per process
        self.stop = self.ctx.RawValue("b", 0)  # set on Ctrl-C: every load process winds down
        self.deadline = time.monotonic() + cfg.timeout

    def start_load_processes(self, targets: tuple[tuple[str, int], ...]) -> None:
        """Split the pairs over ``procs`` processes and start them (they connect at once)."""
        cfg = self.cfg
        run_id = "bench" + secrets.token_hex(4)
        share, extra = divmod(cfg.pairs, cfg.procs)
        first = 0
        # A load process ignores SIGINT (Ctrl-C is the main process's to
        # handle); ignoring it while they start means one that is still
        # importing cannot die of it either (SIG_IGN survives exec).
        old_int = None
        if threading.current_thread() is threading.main_thread():
            old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            for i in range(cfg.procs):
                n = share + (1 if i < extra else 0)
                spec = LoadSpec(i, cfg, targets, first, n, run_id)
                first += n
                ours, theirs = self.ctx.Pipe()
                p = self.ctx.Process(target=load_process_main, args=(spec, theirs, self.shared, self.stop),
                                     name=f"chatpair-bench-{i}", daemon=True)
                p.start()
                theirs.close()
                self.procs.append(p)
                self.pipes.append(ours)
        finally:
            if old_int is not None:
                signal.signal(signal.SIGINT, old_int)

    def gather(self, tag: Phase, progress: Callable[[], tuple[float, str]] | None) -> list[Any]:
        """Wait for message ``tag`` from every load process, reporting progress meanwhile."""
        got: dict[int, Any] = {}
        while len(got) < len(self.pipes):
            if time.monotonic() > self.deadline:
                raise ChatpairError(f"bench timed out after {self.cfg.timeout:g} s")
            waitables: list[Any] = []
            for i, pipe in enumerate(self.pipes):
                if i not in got:
                    waitables += [pipe, self.procs[i].sentinel]
            for ready in mp_wait(waitables, timeout=0.1):
                for i, pipe in enumerate(self.pipes):
                    if i in got:
                        continue
                    if ready is pipe or ready == self.procs[i].sentinel:
                        try:
                            if not pipe.poll():
                                raise EOFError
                            kind, payload = pipe.recv()
                        except (EOFError, OSError):
                            raise ChatpairError(f"load process {i} died (exit code {self.procs[i].exitcode})") \
                                from None
                        if kind is not tag:
                            raise ChatpairError(f"load process {i} said {kind.value!r}, expected {tag.value!r}")
                        got[i] = payload
            if progress and self.progress_fn:
                self.progress_fn(*progress())
        return [got[i] for i in range(len(self.pipes))]

    def interrupt(self, wait: float = 5.0) -> list[LoadReport]:
        """Ctrl-C: ask every load process to wind down; the reports that come within ``wait`` s."""
        self.stop.value = 1
        self.send_all(Phase.STOP)
        deadline = time.monotonic() + wait
        reports: list[LoadReport] = []
        for pipe in self.pipes:
            try:
                while (left := deadline - time.monotonic()) > 0 and pipe.poll(left):
                    kind, payload = pipe.recv()
                    if kind is Phase.DONE:
                        reports.append(payload)
                        break
            except (EOFError, OSError):
                continue
        return reports

    def send_all(self, msg: Phase) -> None:
        """Tell every load process ``msg`` (one that is gone is not told)."""
        for pipe in self.pipes:
            try:
                pipe.send(msg)
            except (BrokenPipeError, OSError):
                pass

    def stop_load_processes(self) -> None:
        """STOP, join, terminate what does not stop; close the pipes."""
        self.send_all(Phase.STOP)
        for p in self.procs:
            p.join(10)
            if p.is_alive():
                p.terminate()
                p.join(5)
        for pipe in self.pipes:
            pipe.close()

    def totals(self) -> tuple[int, int]:
        """Progress summed over the processes: (pairs paired or completed, messages delivered)."""
        a = self.shared
        return sum(a[0::2]), sum(a[1::2])


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM handler: unwind like Ctrl-C, so the ``finally`` clauses run."""
    raise KeyboardInterrupt


def run_bench(config: BenchConfig, progress: ProgressFn | None = None) -> BenchResult:
    """Run one benchmark and return what it measured (see the module docstring).

    ``progress(fraction, label)`` is called a few times a second from this
    process while the load runs. Ctrl-C (or SIGTERM) once the load processes
    run returns the partial result, marked ``interrupted``; before that, or
    a second time, it raises KeyboardInterrupt after cleaning up.
    """
    cfg = config.resolved()
    result = BenchResult(config=asdict(cfg), mode=cfg.mode, pairs=cfg.pairs, procs=cfg.procs, size=cfg.size)
    local: LocalServer | None = None
    loads = LoadProcesses(cfg, progress)
    # SIGTERM (timeout, kill, a CI runner) must stop our server too, as Ctrl-C
    # does: turn it into KeyboardInterrupt so the cleanup below runs.
    old_term = None
    if threading.current_thread() is threading.main_thread():
        old_term = signal.signal(signal.SIGTERM, _interrupt)
    try:
        server: ServerUnderTest | None = None
        if cfg.targets:
            targets = cfg.targets
            if cfg.server_pid:
                server = ServerUnderTest(cfg.server_pid)
        else:
            raise_fd_limit()
            local = LocalServer(cfg.server_args)
            server = local
            targets = ((local.host, local.port),)
            result.server_command = local.command
        # Each server is checked once (is it a chatpair server? TLS, resume, --size), with one
        # clear error, not once per client - nor a wait for pairs that never come.
        for host, port in dict.fromkeys(targets):
            welcome = probe_server(cfg, host, port)
            result.server_welcome = result.server_welcome or welcome
        try:
            _run_phases(cfg, result, loads, server, targets, progress)
        except KeyboardInterrupt:
            if not loads.procs:
                raise
            result.interrupted = True
            if progress:
                progress(1.0, "interrupted: collecting the partial report")
            _merge(result, loads.interrupt(), cfg)
    finally:
        loads.stop_load_processes()
        if local is not None:
            code = local.stop()
            if code not in (0, None):
                result.errors.append(f"the bench server exited with code {code}: {local.log_tail(500)}")
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
    return result


def _run_phases(cfg: BenchConfig, result: BenchResult, loads: LoadProcesses, server: ServerUnderTest | None,
                targets: tuple[tuple[str, int], ...], progress: ProgressFn | None) -> None:
    """Start the load processes and take them through their phases, sampling the server."""
    before = server.stats() if server else None
    if before:
        result.server_local = True
        result.server_pids = before.pids
        result.server_rss_before = before.rss
        result.server_fds_before = before.fds
    loads.start_load_processes(targets)

    def pair_progress() -> tuple[float, str]:
        paired, _ = loads.totals()
        return paired / cfg.pairs, f"pairing {paired}/{cfg.pairs}"

    readies = loads.gather(Phase.READY, None if cfg.mode == "churn" else pair_progress)
    result.pairs_connected = sum(readies) if cfg.mode != "churn" else 0
    mid = server.stats() if server else None
    if mid and before and cfg.mode == "churn":
        # the baseline for the leak check is taken after the warm-up cycles
        before = mid
        result.server_fds_before = mid.fds
    if mid:
        result.server_rss_peak = mid.rss
    go = time.monotonic()
    if progress:
        progress(0.0, "running")
    loads.send_all(Phase.GO)
    expected = 2 * cfg.pairs * (cfg.messages or 0)

    def load_progress() -> tuple[float, str]:
        cycles, delivered = loads.totals()
        if cfg.mode == "churn":
            return (time.monotonic() - go) / max(cfg.duration or 1, 1e-3), f"{cycles} pairs done"
        if cfg.duration:
            return (time.monotonic() - go) / cfg.duration, f"{delivered:,} msgs"
        return delivered / max(expected, 1), f"{delivered:,}/{expected:,} msgs"

    if cfg.mode == "idle":
        loads.gather(Phase.HELD, None)
        _hold(cfg, result, server, before, progress)
        loads.send_all(Phase.CLOSE)
    reports: list[LoadReport] = loads.gather(Phase.DONE, load_progress)
    after = server.stats() if server else None
    if progress:
        progress(1.0, "done")
    _merge(result, reports, cfg)
    if cfg.mode == "idle":
        result.load_cpu = result.load_cpu_total  # connecting is the workload
    elif after and before and mid:
        result.server_cpu = after.cpu - mid.cpu
        result.server_rss_after = after.rss
        result.server_rss_peak = max(result.server_rss_peak or 0, after.rss)
    if server and before and cfg.mode in ("churn", "idle"):
        result.server_fds_after = _settled_fds(server, before.fds)
        stats = server.stats()
        if stats and cfg.mode == "churn":
            result.server_rss_after = stats.rss


def _hold(cfg: BenchConfig, result: BenchResult, server: ServerUnderTest | None, before: ServerStats | None,
          progress: ProgressFn | None) -> None:
    """Idle: every pair is open; measure the server, then hold them for ``duration`` s."""
    held = server.stats() if server else None
    if held and before:
        result.server_rss_after = held.rss
        result.server_rss_peak = max(result.server_rss_peak or 0, held.rss)
        result.memory_per_pair = (held.rss - before.rss) / max(1, result.pairs_connected)
        # idle's work is connecting and pairing: CPU from start to all held
        result.server_cpu = held.cpu - before.cpu
    if not cfg.duration:
        return
    end = time.monotonic() + cfg.duration
    while time.monotonic() < end:  # holding is the workload here
        if progress:
            progress(1 - (end - time.monotonic()) / cfg.duration, "holding")
        time.sleep(min(0.1, max(0.0, end - time.monotonic())))
        now = server.stats() if server else None
        if now:  # the peak while held (keepalives, timers)
            result.server_rss_peak = max(result.server_rss_peak or 0, now.rss)
    result.hold_elapsed = cfg.duration
def _settled_fds(server: ServerUnderTest, target: int, wait: float = 5.0) -> int | None:
    """The server's descriptor count once closes have been processed (or after ``wait`` s)."""
    end = time.monotonic() + wait
    while True:
        stats = server.stats()
        if stats is None:
            return None
        if stats.fds <= target or time.monotonic() >= end:
            return stats.fds
        time.sleep(0.05)  # the server closes asynchronously; poll /proc briefly


def _merge(result: BenchResult, reports: list[LoadReport], cfg: BenchConfig) -> None:
    """Add the load processes' reports into ``result`` and work out the rates."""
    for r in reports:
        result.add_counts(r)
        result.errors.extend(r.errors)
        result.latency.merge(LogHistogram(r.latency))
        result.rtt.merge(LogHistogram(r.rtt))
        result.pair_time.merge(LogHistogram(r.pair_time))
        result.churn_cycles += r.cycles
        result.load_cpu += r.cpu_end - r.cpu_go
        result.load_cpu_total += r.cpu_end
        result.acks_sent += r.acks_sent
        result.acks_received += r.acks_received
    if cfg.mode == "churn":
        result.pairs_connected = sum(r.paired for r in reports)
    result.add_targets(reports, cfg.targets)
    t_go = min((r.t_go for r in reports if r.t_go), default=0)
    t_end = max((r.t_end for r in reports), default=0)
    result.elapsed = max(0.0, (t_end - t_go) / 1e9)
    result.ticks = _timeline(reports, t_go, t_end)
    if result.interrupted:
        # Cut short: what had not arrived yet was in flight, not lost.
        result.in_flight, result.lost = result.lost, 0
    if result.elapsed > 0 and cfg.mode in ("flood", "pingpong", "churn"):
        result.msgs_per_s = result.delivered / result.elapsed
        result.mb_per_s = result.delivered * cfg.size / result.elapsed / 1e6
    t_c0 = min((r.t_connect0 for r in reports if r.t_connect0), default=0)
    t_c1 = max((r.t_connected for r in reports), default=0)
    if t_c0 and t_c1 > t_c0:
        result.connect_elapsed = (t_c1 - t_c0) / 1e9
    if cfg.mode == "churn":
        result.pairs_per_s = result.churn_cycles / result.elapsed if result.elapsed else 0.0
    elif result.connect_elapsed:
        result.pairs_per_s = result.pairs_connected / result.connect_elapsed


def _timeline(reports: list[LoadReport], t_go: int, t_end: int) -> list[int]:
    """Messages delivered per tick (:data:`TICK_NS`) from 'go' to the end, summed over the processes."""
    if not t_go or t_end <= t_go:
        return []
    first, last = t_go // TICK_NS, t_end // TICK_NS
    out = [0] * (last - first + 1)
    for r in reports:
        for tick, n in r.ticks.items():
            i = tick - first
            if 0 <= i < len(out):
                out[i] += n
            elif i >= len(out):  # arrived after the measured end (flood: at most a few)
                out[-1] += n
    return out
