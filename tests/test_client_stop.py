"""How a client run ends: signals in pipe mode, errors said once, Ctrl-C while connecting.

* SIGTERM or SIGHUP to a pipe client ends it as end of input does: what was
  read is sent, then BYE, so the partner sees "left (bye)" - not "lost the
  connection" with the server keeping a resumable session for 30 s; the exit
  code is 128 + the signal (143, 129), as Ctrl-C's is 130;
* a refusal after WELCOME (``room_full``) is one line on stderr (exit 3), not
  also a line on stdout;
* Ctrl-C while connecting is ``chatpair: interrupted`` (exit 130).

Real processes: ``python -m chatpair client`` (test_client's ``Proc``), a real
server, and a raw frame client as the partner. Every wait has a deadline.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

import pytest
from test_client import MSG, PAIRED, PEER_LEFT, ROOT, fill_room, pair_raw

pytestmark = [pytest.mark.timeout(60),
              pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")]


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_a_signal_ends_pipe_mode_with_bye_after_what_was_typed(server, raw_client, clients, sig, code):
    raw = pair_raw(raw_client, server.port, name="bob", room="r7")
    me = clients("--port", str(server.port), "--name", "pipe7", "--room", "r7")  # stdin stays open
    assert raw.expect(PAIRED)["peer"] == "pipe7"
    me.wait_for(b"* paired with bob\n")
    me.write(b"hi\n")
    assert raw.expect(MSG) == b"hi"
    me.proc.send_signal(sig)
    # The partner is told the client left, not that it lost its connection.
    assert raw.expect(PEER_LEFT) == {"peer": "pipe7", "reason": "bye"}
    got, out, err = me.finish()
    assert (got, err) == (code, b"")
    assert b"lost" not in out


def test_a_signal_does_not_wait_for_ever_for_a_partner(server, clients):
    # A held line (no partner yet) is waited for at end of input; on SIGTERM only briefly.
    me = clients("--port", str(server.port), "--name", "lonely", "--room", "empty", stdin_data=b"/help\nhi\n")
    me.wait_for(b"/quit")  # the help text: both lines were read
    me.wait_for(b"waiting for a partner")
    start = time.monotonic()
    me.proc.send_signal(signal.SIGTERM)
    code, out, err = me.finish(timeout=15)
    assert code == 143
    assert err.decode() == "chatpair: 1 line not sent (stopped by a signal before a partner came)\n"
    assert time.monotonic() - start < 10  # QUIT_ACK_WAIT (5 s) and BYE, not for ever


def test_room_full_is_said_once_on_stderr(server, raw_client, clients):
    fill_room(raw_client, server.port, "full")
    me = clients("--port", str(server.port), "--name", "eve", "--room", "full")
    code, out, err = me.finish()
    assert code == 3
    text = err.decode()
    assert text.count("\n") == 1 and text.startswith("chatpair: ") and "full" in text, text
    assert b"error" not in out and b"full" not in out  # not also on stdout


def test_room_full_with_json_is_an_event_on_stdout(server, raw_client, clients):
    fill_room(raw_client, server.port, "full")
    me = clients("--port", str(server.port), "--name", "eve", "--room", "full", "--json")
    code, out, err = me.finish()
    assert code == 3 and err.decode().count("\n") == 1
    assert b'"event": "error"' in out and b'"room_full"' in out


def test_ctrl_c_while_connecting_says_interrupted(tmp_path):
    # A server that accepts and never speaks: the client is still connecting when Ctrl-C comes.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.settimeout(10)
        port = listener.getsockname()[1]
        proc = subprocess.Popen([sys.executable, "-m", "chatpair", "client", "--port", str(port), "--name", "x",
                                 "--timeout", "30"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, cwd=ROOT)
        try:
            conn, _ = listener.accept()  # it is connecting now
            with conn:
                proc.send_signal(signal.SIGINT)
                out, err = proc.communicate(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert proc.returncode == 130
    lines = [line for line in err.decode().splitlines() if line.strip()]
    assert lines == ["chatpair: interrupted"], err
    assert out == b""

