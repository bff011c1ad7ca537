"""The chatpair client: reach a server, get paired, chat.

It imports :mod:`chatpair.proto` (every rule of the protocol, including the
client's side of it: :mod:`chatpair.proto.clientside`), :mod:`chatpair.errors`
and :mod:`chatpair.netutil`; never the server or the bench. Nothing here
imports click (the CLI does).

=============  ===============================================================
module         what lives there
=============  ===============================================================
``config``     :class:`ClientConfig` and its defaults; ``HOST[:PORT]``, the
               default name, TLS fingerprints
``transport``  TCP, TLS (CA-verified, pinned, or trusted on first use), OS errors in words
``trust``      ``known_servers`` (trust on first use) and the question asked once
``greeting``   naming what answered when it is not a chatpair server
``progress``   ``connecting to HOST:PORT...``
``session``    :func:`connect` and :class:`~.session.Connection`: the socket
               fed to the sans-IO protocol; handshake deadline, sends, BYE
``resuming``   a dropped session: what counts as a drop, when to retry
``present``    events -> sanitized display lines, ``--json``, ``--log``
``commands``   what a typed line means (``/next``, ``/quit``, ``/ping``...)
``stdin``      lines from standard input, waited on with a selector
``pipe``       pipe (script) mode
``run``        :func:`run_client`: the chat screen in a terminal, else pipe mode
``tui/``       the curses chat screen
=============  ===============================================================

The names the CLI needs are here; everything else has one home above.
"""

from chatpair.client.config import ClientConfig, default_name, parse_fingerprint, resolve_target
from chatpair.client.run import run_client

__all__ = ["ClientConfig", "default_name", "parse_fingerprint", "resolve_target", "run_client"]
