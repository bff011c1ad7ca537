"""The interactive client: a full-screen chat in a terminal, drawn with curses.

=============  ===============================================================
module         what lives there
=============  ===============================================================
``app``        the loop (:class:`~.app.TuiApp`) and :func:`~.app.run_tui`,
               which always gives the terminal back
``link``       the connection, kept up: selector watch, backoff, the
               reconnect thread
``keys``       the key map: editing keys and what the app acts on
``screen``     drawing with curses (the only module that draws)
``widgets``    the input line and the conversation log, without curses
``terminal``   screen-cell widths, clusters (ZWJ emoji, flags), wrapping and
               clipping, without curses
``emoji``      the one table the standard library lacks (VS16 widens)
=============  ===============================================================

Only ``app``, ``keys`` and ``screen`` touch curses, and each imports it so
that a Python without curses can still import the package (pipe mode is the
fallback there).
"""
