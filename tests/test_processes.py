"""What every server child process does first (server/processes.py), in a real spawned process."""

from __future__ import annotations

import logging
import multiprocessing

from chatpair.server.processes import (
    FD_TABLE_PRESIZE_CAP,
    GC_YOUNG_THRESHOLD,
    prepare_child_process,
)


def _fd_table_size() -> int | None:
    """The kernel's descriptor table size for this process (Linux: FDSize in /proc/self/status)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("FDSize:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _child(answer: multiprocessing.connection.Connection) -> None:
    import gc
    import resource
    import signal

    before = gc.get_threshold()
    table_before = _fd_table_size()
    prepare_child_process(logging.WARNING)
    answer.send((before, gc.get_threshold(), signal.getsignal(signal.SIGINT) is signal.SIG_IGN,
                 table_before, _fd_table_size(), resource.getrlimit(resource.RLIMIT_NOFILE)[0]))


def test_a_child_runs_young_collections_less_often_and_ignores_stop_signals() -> None:
    ctx = multiprocessing.get_context("spawn")
    ours, theirs = ctx.Pipe()
    child = ctx.Process(target=_child, args=(theirs,))
    child.start()
    try:
        assert ours.poll(30), "the child did not answer"
        before, after, ignores_ctrl_c, table_before, table_after, limit = ours.recv()
    finally:
        child.join(10)
        if child.is_alive():  # it ignores SIGTERM (prepare_child_process): nothing but SIGKILL stops it
            child.kill()
            child.join(10)
    assert before[0] < GC_YOUNG_THRESHOLD  # CPython's own default (700)
    assert after == (GC_YOUNG_THRESHOLD, before[1], before[2])
    assert ignores_ctrl_c
    assert child.exitcode == 0
    if table_before is not None:  # Linux: the descriptor table is full size once the child is prepared
        # (a spawned child starts with its parent's table, which may be big already: only "after" is checked)
        assert table_after >= min(limit, FD_TABLE_PRESIZE_CAP)
