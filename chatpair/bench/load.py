"""A load process: the entry point, and how its layers stack.

The main process starts ``procs`` load processes (multiprocessing, spawn
context) with :func:`load_process_main`. Each owns a share of the pairs:
both clients of a pair live in the same process and meet in a room of their
own, so the server pairs them with each other and never across processes.

The conversation over the pipe (:class:`Phase`)::

    load process                      main process
    ------------                      ------------
    connect and pair (prepare)
    (READY, pairs paired)    ----->
                             <-----   GO  (or STOP)
    run the workload
    [idle: (HELD, None)      ----->   measures the server
                             <-----   CLOSE]
    (DONE, LoadReport)       ----->
                             <-----   STOP

On Ctrl-C the main process sets the shared stop flag and sends STOP: a load
process still connecting stops, one told STOP instead of GO reports its
pairing, one running stops sending and reports once what was in flight has
arrived (or after a second). Every path ends with DONE and a report, so a
partial report can be printed.

A load process is one object of the workload's class, built in layers, each
a class of its own concern that the next one extends:

==========================  ================================================
``LoadAccounts``            counts, histograms, progress, the report
``LoadConnections``         connect, HELLO, pairing, close
``LoadSending``             frames out: queues, flood batches
``LoadAcking``              --resume: counting and ACK frames
``LoadTraffic``             frames in, the exact checks, the loop
``FloodLoad`` ...           one traffic pattern per ``--mode``
==========================  ================================================

Layers by inheritance, not separate objects, because the hot paths call
across them (a receive makes a ping-pong answer, which writes): each such
call stays one ``self.method`` look-up, as it was when this was one class.
"""

from __future__ import annotations

import os
import signal
import time
from enum import Enum
from multiprocessing.connection import Connection
from typing import Any

from chatpair.bench.load_accounts import LoadSpec
from chatpair.bench.load_modes import LOADS
from chatpair.netutil import raise_fd_limit


class Phase(Enum):
    """What the main process and a load process say to each other over the pipe."""

    READY = "ready"  # load -> main: paired, waiting for GO (payload: pairs paired)
    GO = "go"  # main -> load: start the workload
    HELD = "held"  # load -> main (idle): pairs open, measure the server now
    CLOSE = "close"  # main -> load (idle): measured, close them
    DONE = "done"  # load -> main: the LoadReport
    STOP = "stop"  # main -> load: the run is over (or aborted)


def cpu_seconds() -> float:
    """User + system CPU seconds of this process so far."""
    t = os.times()
    return t.user + t.system


def load_process_main(spec: LoadSpec, pipe: Connection, progress: Any, stop: Any = None) -> None:
    """Entry point of a load process: connect, report ready, wait for go, run, report.

    ``stop`` is a shared flag the main process sets on Ctrl-C: the load
    process then winds down (stops connecting or sending) and reports what
    it has; STOP instead of GO also gets a report, of the pairing alone.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process decides when to stop
    raise_fd_limit()
    load = LOADS[spec.config.mode](spec, progress)
    load.stop_flag = stop
    try:
        load.prepare()
        pipe.send((Phase.READY, load.paired))
        if pipe.recv() is Phase.GO:
            load.report.t_go = time.monotonic_ns()
            load.report.cpu_go = cpu_seconds()
            load.measuring = True
            load.run()
            load.report.t_end = load.measured_end()
            if load.holds_pairs:
                # Hold the pairs until the main process has measured the server,
                # answering the server's PINGs meanwhile.
                pipe.send((Phase.HELD, None))
                while not pipe.poll():
                    load.step(0.1)
                    load.tick_acks(time.monotonic_ns())
                pipe.recv()
        report = load.finish_report()
        load.close_all()
        report.cpu_end = cpu_seconds()
        pipe.send((Phase.DONE, report))
    except (EOFError, BrokenPipeError, KeyboardInterrupt):
        load.close_all()
    finally:
        load.poller.close()
        pipe.close()
