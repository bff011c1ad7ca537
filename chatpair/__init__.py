"""chatpair: 1:1 pair chat over TCP.

The package keeps three things apart, so each can be read on its own:

* :mod:`chatpair.proto` - the wire format, sans-IO (bytes in, events out);
* :mod:`chatpair.server.listener` - the pairing listener process (accept, handshake, lobby);
* :mod:`chatpair.server.relay`    - the room relay threads that move messages between partners.

:mod:`chatpair.server` starts and stops the listener process, :mod:`chatpair.client`
talks to a server, :mod:`chatpair.bench` measures one, and :mod:`chatpair.cli` is the
thin click layer over all of them.
"""

__version__ = "0.1.0"

from chatpair.errors import ChatpairError  # noqa: E402  (re-export after the version)

__all__ = ["__version__", "ChatpairError"]
