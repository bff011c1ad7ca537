"""The channel between the listener and a relay worker: JSON messages carrying sockets.

A channel is one end of a Unix stream socket pair, non-blocking, driven by
the owner's selector loop. A message is a JSON object plus the sockets it
hands over; on the wire it is ``uint32 length + JSON``, with the message's
descriptors (``socket.send_fds``, SCM_RIGHTS) riding on its first byte and
``"nfds"`` in the JSON saying how many belong to it.

Because it is a stream, reads and messages do not line up: one read may
bring several messages, or part of one, and a message's descriptors may
arrive before the rest of its bytes. The receiver therefore keeps bytes and
descriptors in two queues, in arrival order, and pairs them up when a
message is complete. The sender closes a socket as soon as the kernel holds
its descriptor in flight: one owner at a time, across processes too. On
:meth:`Channel.close`, descriptors that never made it across (a send that
failed, a message the other side did not finish) are closed, not leaked.
"""

from __future__ import annotations

import json
import os
import socket
import struct
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

_LEN = struct.Struct(">I")
#: One read takes at most this much: many hand-overs at once, in one call.
RECV_SIZE = 262144
#: Descriptors one read can take: a message carries at most two, and the
#: kernel never joins the descriptors of two messages into one read.
MAX_FDS_PER_READ = 64

#: A received message: the JSON object and the sockets it carried.
Message = tuple[dict[str, Any], list[socket.socket]]


@dataclass(slots=True)
class _Outgoing:
    """A message (or what is left of it) waiting for the socket to take it."""

    data: bytes
    #: Sockets whose descriptors ride on the first byte; emptied (and the
    #: sockets closed) once that byte is sent, as the kernel then holds them.
    socks: list[socket.socket] = field(default_factory=list)


class Channel:
    """Non-blocking message channel over a Unix stream socket, carrying descriptors.

    For callers: :meth:`send`, :meth:`flush` when the socket is writable,
    :meth:`receive` when it is readable, :attr:`has_output` to know whether
    to ask for writability, :attr:`closed` once the other side is gone, and
    :meth:`close`.
    """

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.closed = False  # end of file, or an error sending: the other side is gone
        self._rbuf = bytearray()
        self._fds: deque[int] = deque()  # received, not yet claimed by a complete message
        self._out: deque[_Outgoing] = deque()

    def fileno(self) -> int:
        return self.sock.fileno()

    @property
    def has_output(self) -> bool:
        return bool(self._out)

    def send(self, obj: dict[str, Any], socks: Iterable[socket.socket] = ()) -> None:
        """Queue ``obj`` with ``socks`` and send what the socket takes now.

        The sockets belong to the channel from here on: it closes them once
        their descriptors are on their way (or on :meth:`close`).
        """
        handed = list(socks)
        obj["nfds"] = len(handed)
        data = json.dumps(obj, separators=(",", ":")).encode()
        self._out.append(_Outgoing(_LEN.pack(len(data)) + data, handed))
        self.flush()

    def flush(self) -> None:
        """Send queued messages until the socket would block."""
        while self._out:
            item = self._out[0]
            try:
                if item.socks:
                    sent = socket.send_fds(self.sock, [item.data], [s.fileno() for s in item.socks])
                    for s in item.socks:  # the kernel holds duplicates in flight now
                        s.close()
                    item.socks = []
                else:
                    sent = self.sock.send(item.data)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.closed = True
                return
            if sent < len(item.data):
                item.data = item.data[sent:]
                return
            self._out.popleft()

    def receive(self) -> list[Message]:
        """Read what is there (one read); return the messages it completed, with their sockets."""
        try:
            data, fds, _flags, _addr = socket.recv_fds(self.sock, RECV_SIZE, MAX_FDS_PER_READ)
        except (BlockingIOError, InterruptedError):
            return []
        except OSError:
            data, fds = b"", []
        self._fds.extend(fds)
        if not data:
            self.closed = True
            return []
        self._rbuf += data
        out: list[Message] = []
        while len(self._rbuf) >= _LEN.size:
            (length,) = _LEN.unpack_from(self._rbuf, 0)
            end = _LEN.size + length
            if len(self._rbuf) < end:
                break
            obj = json.loads(self._rbuf[_LEN.size:end])
            del self._rbuf[:end]
            socks = [socket.socket(fileno=self._fds.popleft()) for _ in range(obj.get("nfds", 0))]
            out.append((obj, socks))
        return out

    def close(self) -> None:
        self.closed = True
        self.sock.close()
        # Descriptors that never made it across are still ours to close: a
        # message whose send failed (the other side died), or the descriptors
        # of a message the other side did not finish sending.
        for item in self._out:
            for s in item.socks:
                s.close()
        self._out.clear()
        while self._fds:
            try:
                os.close(self._fds.popleft())
            except OSError:
                pass
