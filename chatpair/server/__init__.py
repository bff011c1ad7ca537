"""The chatpair server: a main process, a pairing listener process, room relays.

Imports :mod:`chatpair.proto`, :mod:`chatpair.errors` and
:mod:`chatpair.netutil`; never the client or the bench.

=============  ==============================================================
module         what lives there
=============  ==============================================================
``main``       the main process: bind, start/supervise/stop the listener,
               keys and signals
``listener``   the pairing listener process: accept, banner, handshake,
               lobby, hand-over to relays
``lobby``      pairing rules, no sockets
``relay``      room relay loops (threads): full duplex between partners
``workers``    relay worker processes and the channel that moves sockets
``loop``       the selector loop the listener and the relays share
``conn``       one client's state and how server events look in each mode
=============  ==============================================================
"""
