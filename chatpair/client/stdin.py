"""Lines from standard input for pipe mode, waited on with a selector.

:class:`LineReader` splits bytes into lines (sans-IO); :class:`StdinSource`
reads a file descriptor without blocking the loop, on every platform.
"""

from __future__ import annotations

import codecs
import os
import queue
import selectors
import socket
import threading

from chatpair.netutil import Waker

READ_SIZE = 65536


class LineReader:
    """Non-blocking-friendly line splitter for a byte stream (stdin).

    Bytes that are not UTF-8 become U+FFFD; a ``\\r`` before ``\\n`` is dropped.
    """

    def __init__(self) -> None:
        self._dec = codecs.getincrementaldecoder("utf-8")("replace")
        self._partial = ""

    def feed(self, data: bytes) -> list[str]:
        """Complete lines in ``data``; ``b""`` (EOF) flushes a last unterminated line."""
        text = self._partial + self._dec.decode(data, final=not data)
        parts = text.split("\n")
        self._partial = parts.pop()
        if not data and self._partial:
            parts.append(self._partial)
            self._partial = ""
        return [p[:-1] if p.endswith("\r") else p for p in parts]


class StdinSource:
    """Lines from a file descriptor, waited on with a selector.

    POSIX ``select`` works for terminals, pipes, sockets and regular files.
    Where it does not (Windows consoles and pipes), a reader thread owned by
    this object feeds a queue and wakes the selector through a
    :class:`~chatpair.netutil.Waker`; :meth:`close` stops it from reading
    further and joins it if it has finished (a thread blocked in a console
    read cannot be interrupted: it ends at the next line or at exit).
    """

    def __init__(self, fd: int, sel: selectors.BaseSelector) -> None:
        self.fd = fd
        self.sel = sel
        self.reader = LineReader()
        self.eof = False
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue[bytes] = queue.Queue()
        self._waker: Waker | None = None
        self._stop = threading.Event()
        self._registered = False
        try:
            sel.register(fd, selectors.EVENT_READ, self)
            self._registered = True
        except (OSError, ValueError):
            self._start_thread()

    def set_paused(self, paused: bool) -> None:
        """Stop (or resume) reading while the connection cannot take more."""
        if self._thread is not None or self.eof or paused != self._registered:
            return
        if paused:
            self.sel.unregister(self.fd)
        else:
            self.sel.register(self.fd, selectors.EVENT_READ, self)
        self._registered = not paused

    def _start_thread(self) -> None:
        self._waker = Waker()
        self.sel.register(self._waker.reader, selectors.EVENT_READ, self)
        self._thread = threading.Thread(target=self._pump, args=(self._waker,), name="chatpair-stdin",
                                        daemon=True)
        self._thread.start()

    def _pump(self, waker: Waker) -> None:
        while not self._stop.is_set():
            try:
                data = os.read(self.fd, READ_SIZE)
            except OSError:
                data = b""
            self._queue.put(data)
            waker.wake()
            if not data:
                return

    def read_lines(self) -> list[str]:
        """Call when the selector says readable; sets ``eof`` at end of input."""
        if self._waker is None:
            try:
                data = os.read(self.fd, READ_SIZE)
            except BlockingIOError:
                return []
            except OSError:
                data = b""
            chunks = [data]
        else:
            self._waker.drain()
            chunks = []
            while not self._queue.empty():
                chunks.append(self._queue.get_nowait())
        lines: list[str] = []
        for data in chunks:
            lines += self.reader.feed(data)
            if not data:
                self.eof = True
                self._unregister()
                break
        return lines

    def _unregister(self) -> None:
        self._registered = False
        self._forget(self.fd)
        if self._waker is not None:
            self._forget(self._waker.reader)

    def _forget(self, obj: int | socket.socket) -> None:
        try:
            self.sel.unregister(obj)
        except (KeyError, ValueError, OSError):
            pass  # never registered, or already forgotten

    def close(self) -> None:
        self._stop.set()
        self._unregister()
        if self._waker is not None:
            self._waker.close()
        if self._thread is not None:
            self._thread.join(timeout=0.1)
