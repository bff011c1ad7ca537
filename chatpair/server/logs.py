"""How the server logs: one line per event on stderr, cheap enough for the default level.

Every process of the server (main, listener, relay workers) logs in the same
format: ``text`` (:class:`TextFormatter`, for people) or ``json``
(:class:`JsonFormatter`, for log shippers). The listener and the relay
workers log through :class:`BatchedStderrHandler`, which the selector loops
flush once per timer tick instead of a write system call per line.

At the default level the listener writes a line per pair made, and that
line is most of what a log line costs a busy server, so a record here is
made cheaply: no caller lookup, thread or process id (the standard knobs of
the logging HOWTO's "Optimization" section; the format uses none of them),
and the time's ISO 8601 text made once a second, not once a line.
"""

from __future__ import annotations

import atexit
import io
import json
import logging
import multiprocessing
import sys
from datetime import datetime
from typing import Any

from chatpair.server.config import DEFAULT_LOG_FORMAT

LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"

#: (whole second, its ISO 8601 text up to the seconds, the UTC offset): made
#: once a second by :func:`iso_time` (one tuple, so a thread reads a
#: consistent one).
_second: tuple[int, str, str] = (-1, "", "")


def iso_time(created: float) -> str:
    """A log record's time in ISO 8601, local time with its UTC offset, to the millisecond."""
    global _second
    whole = int(created)
    second = _second
    if second[0] != whole:
        text = datetime.fromtimestamp(whole).astimezone().isoformat(timespec="seconds")
        # "2025-05-01T12:34:56+02:00" -> the seconds and the offset, either side of the milliseconds
        second = _second = (whole, text[:19], text[19:])
    return f"{second[1]}.{int((created - whole) * 1000):03d}{second[2]}"


#: Which of the server's processes this is: main, listener, relay-worker-N
#: (set by :func:`setup_logging`, as records carry no process name).
_role = "main"


def process_role() -> str:
    """Which of the server's processes writes this process's records: main, listener, relay-worker-N."""
    return _role


class TextFormatter(logging.Formatter):
    """``2025-05-01T12:34:56.789+02:00 INFO message``: the default format, for people."""

    def __init__(self) -> None:
        super().__init__(LOG_FORMAT)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return iso_time(record.created)


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers.

    Keys: ``time`` (ISO 8601), ``level`` (lower case), ``message`` (the text
    line's message), ``process`` (main, listener, relay-worker-N), then the
    record's ``fields`` (``log.info(..., extra={"fields": {...}})``: numbers
    stay numbers), and ``exception`` with the traceback if there is one. A
    newline inside a value is escaped, so one record is always one line.
    """

    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, Any] = {"time": iso_time(record.created), "level": record.levelname.lower(),
                               "message": record.getMessage(), "process": _role}
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            for key, value in fields.items():
                obj.setdefault(key, value)
        if record.exc_info:
            obj["exception"] = self.formatException(record.exc_info)
        return json.dumps(obj, ensure_ascii=False, default=str)


def make_formatter(log_format: str) -> logging.Formatter:
    return JsonFormatter() if log_format == "json" else TextFormatter()


class BatchedStderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Log lines to stderr through a buffer that the selector loops flush once per batch.

    A plain StreamHandler flushes (one write system call) per line; at the
    default log level a busy listener writes a few lines per client, and
    those writes were half the cost of connect+pair. The loops call
    :func:`flush_logs` at every timer tick (TICK_SECONDS, a quarter of a
    second) and when they stop, so a line reaches stderr soon after the event.
    """

    def __init__(self) -> None:
        stream = io.TextIOWrapper(io.BufferedWriter(io.FileIO(sys.stderr.fileno(), "w", closefd=False), 1 << 16),
                                  encoding="utf-8", errors="backslashreplace", line_buffering=False)
        super().__init__(stream)

    def flush(self) -> None:
        """Called by emit() after every record: deliberately nothing (see flush_now)."""

    def flush_now(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            try:
                self.stream.flush()
            except (OSError, ValueError):
                pass  # stderr closed or gone: nothing more to say

    def close(self) -> None:
        self.flush_now()
        super().close()


_batched: BatchedStderrHandler | None = None


def flush_logs() -> None:
    """Write out buffered log lines (a no-op unless this process logs through a buffer)."""
    if _batched is not None:
        _batched.flush_now()


def setup_logging(level: int, batched: bool = False, log_format: str = DEFAULT_LOG_FORMAT) -> None:
    """Log lines on stderr, with the date and time: the same format in every process of the server.

    ``batched`` (the listener and relay workers) buffers lines until the
    selector loop calls :func:`flush_logs`; they are also flushed at exit.
    ``log_format`` is "text" (:class:`TextFormatter`) or "json" (:class:`JsonFormatter`).
    """
    global _batched, _role
    name = multiprocessing.current_process().name
    _role = "main" if name == "MainProcess" else name.removeprefix("chatpair-")
    # What a record would otherwise look up for every line, and no format here uses.
    logging._srcfile = None  # the caller's file and line (logging HOWTO, "Optimization")
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler: logging.Handler
    if batched:
        handler = _batched = BatchedStderrHandler()
        atexit.register(flush_logs)
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(make_formatter(log_format))
    logging.basicConfig(level=level, handlers=[handler])
