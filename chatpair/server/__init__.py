"""The chatpair server: a main process, a pairing listener process, room relays.

Imports :mod:`chatpair.proto`, :mod:`chatpair.errors` and
:mod:`chatpair.netutil`; never the client or the bench.
``docs/architecture.md`` draws the processes, threads and sockets.

Processes
    ``main`` (bind, start/supervise/stop the listener), ``keys`` (any key
    stops it), ``processes`` (signals, restart backoff, the resource tracker
    - what every server process shares), ``config`` (every option and
    default, the log format).

The pairing listener process
    ``listener`` (its loop: lobby and hand-overs), ``accept`` (batched
    accept), ``admission`` (--max-clients, --max-per-ip; no sockets),
    ``reception`` (a connection's first seconds), ``handshake`` (HELLO,
    sans-IO), ``lobby`` (pairing rules; no sockets), ``relay_pool`` (which
    relay gets a pair).

Room relays
    ``relay`` (full duplex between partners; RelayThread), ``workers``
    (relay worker processes for more cores), ``channel`` (the listener <->
    worker channel: JSON messages carrying sockets).

The selector loop every one of them runs
    ``loop`` (ConnLoop: selector, dispatch, ownership), ``reader`` (input),
    ``scanner`` (the fast frame scanner, a pure function), ``output`` (queues
    and flow control), ``ratelimit``, ``timers`` (keepalive, idle, write
    deadline as pure decisions), ``closing`` (the polite close), ``tls``,
    ``conn`` and ``states`` (one connection and its named states), ``render``
    (server events as bytes in frame or line mode).
"""
