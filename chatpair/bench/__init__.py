"""``chatpair bench``: load generation and exact statistics, returning a result object.

The shape
    The main process starts (or targets) a server, then starts ``procs``
    *load processes* (multiprocessing, spawn context) so that the load is not
    the bottleneck. Each load process owns a share of the pairs: both clients
    of a pair live in the same process and meet in a room of their own, so
    the server pairs them with each other and never across processes. The
    main process only orchestrates (ready / go / done over a pipe), watches
    progress through a shared array, and samples the server's RSS, CPU and
    descriptors from ``/proc`` when the server is local.

What it may use
    :mod:`chatpair.proto` (the wire format), :mod:`chatpair.netutil` and
    :mod:`chatpair.errors`. It reaches the server only over sockets and as a
    subprocess (``python -m chatpair server``), never by importing it, so it
    measures any server that speaks the protocol. Nothing here prints:
    :mod:`chatpair.bench.report` renders a result and :mod:`chatpair.cli` is
    the only place that talks to a terminal.

===================  ========================================================
module               what lives there
===================  ========================================================
``config``           BenchConfig (every knob, each default once), tuning
                     constants, the ``--target`` addresses (one server, or
                     several: client k on target k mod N, partners apart)
``messages``         the numbered, timestamped MSG payloads: MessageFactory
``histogram``        LogHistogram (percentiles within 1.6 %)
``result``           BenchResult, MessageCounts
``orchestrate``      run_bench: server, load processes, phases, the result
``target``           the server under test: started as a subprocess or
                     given by pid; /proc samples
``load``             a load process's entry point and its layers (read its
                     docstring first), then ``load_state`` (Client, Pair),
                     ``load_accounts``, ``load_connect``, ``load_sending``,
                     ``load_acks`` (--resume), ``load_traffic`` (the hot
                     loops and the exact checks), ``load_modes`` (flood,
                     pingpong, idle, churn)
``probe``            one connection before the load: TLS and resume checked
                     once, with one clear error
``plot``             ``--plot``: the latency distribution and throughput over
                     time as an SVG (PNG through ``rsvg-convert``)
``poller``           epoll (or selectors) by descriptor
``report``           the table, the histogram, the progress bar (text)
===================  ========================================================
"""

from chatpair.bench.config import MODES, BenchConfig, target_address, target_addresses
from chatpair.bench.histogram import LogHistogram
from chatpair.bench.messages import BATCH, MessageFactory
from chatpair.bench.orchestrate import run_bench
from chatpair.bench.report import ProgressBar, render, render_histogram
from chatpair.bench.result import BenchResult

__all__ = [
    "BATCH", "MODES", "BenchConfig", "BenchResult", "LogHistogram", "MessageFactory", "ProgressBar",
    "render", "render_histogram", "run_bench", "target_address", "target_addresses",
]
