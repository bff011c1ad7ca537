"""The client: pure helpers (no sockets), then pipe mode against a real server.

Pipe-mode tests run ``python -m chatpair client`` as a subprocess with pipes
for stdin/stdout, and a raw frame client (conftest's ``raw_client``) as the
partner, so what is checked is the exact bytes on the client's stdout and on
the wire. Every wait has a deadline; nothing sleeps to let something happen.
"""

from __future__ import annotations

import json
import os
import re
import selectors
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import ServerProcess

from chatpair.client.commands import parse_input
from chatpair.client.config import ClientConfig, format_fingerprint, make_valid_name, parse_fingerprint
from chatpair.client.config import resolve_target as parse_target
from chatpair.client.present import Presenter, event_json
from chatpair.client.stdin import LineReader
from chatpair.client.tui.terminal import char_width, clip, input_view, str_width, wrap
from chatpair.client.tui.widgets import ChatLog, InputLine
from chatpair.errors import ConfigError
from chatpair.proto.clientside import split_message
from chatpair.proto.events import Closed, Message, Paired, PeerLeft, ServerError, Waiting

ROOT = Path(__file__).resolve().parent.parent
MSG, NEXT, BYE, PING, PONG = 0x02, 0x03, 0x04, 0x05, 0x06
WELCOME, WAITING, PAIRED, PEER_LEFT, NOTICE, ERROR = 0x10, 0x11, 0x12, 0x13, 0x14, 0x1F

#: Everything a hostile partner might try: ESC sequences (CSI, OSC title,
#: OSC 8 link), BEL, C1 controls (CSI 0x9b, OSC 0x9d), DEL, bidi override.
HOSTILE = ("\x1b[2J\x1b[31mred\x07 \x1b]0;pwned\x07 \x1b]8;;http://evil\x1b\\link\x1b]8;;\x1b\\ "
           "\x9b31m \x9d0;t\x9c \x7f \u202egnp.exe")


# ---------------------------------------------------------------------------
# Pure helpers
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("args,expected", [
    ((None, None, None), ("127.0.0.1", 7878)),
    (("example.org", None, None), ("example.org", 7878)),
    (("example.org:9000", None, None), ("example.org", 9000)),
    ((":9000", None, None), ("127.0.0.1", 9000)),
    (("[::1]:9000", None, None), ("::1", 9000)),
    (("::1", None, 9000), ("::1", 9000)),
    ((None, "h", 5), ("h", 5)),
    (("h:5", "h", 5), ("h", 5)),
])
def test_parse_target(args, expected):
    assert parse_target(*args) == expected


@pytest.mark.parametrize("args", [("a:1", None, 2), ("a", "b", None), ("a:x", None, None), ("a:0", None, None)])
def test_parse_target_conflicts(args):
    with pytest.raises(ConfigError):
        parse_target(*args)


@pytest.mark.parametrize("args,kw,expected", [
    (("example.org", None, None, "9000"), {}, ("example.org", 9000)),          # nc habit: HOST PORT
    (("[::1]", None, None, "9000"), {}, ("::1", 9000)),
    (("::1", None, None, "9000"), {}, ("::1", 9000)),
    (("h:5", None, 5, "5"), {}, ("h", 5)),                                   # the same port thrice
    (("chatpair://example.org:9000", None, None), {}, ("example.org", 9000)),
    (("chatpair://example.org", None, None), {}, ("example.org", 7878)),
    (("CHATPAIR://example.org:9000/", None, None), {}, ("example.org", 9000)),
    (("chatpair://[::1]:9000", None, None), {}, ("::1", 9000)),
    (("chatpair://[::1]", None, 9000), {}, ("::1", 9000)),
    ((None, "chatpair://h:5", None), {}, ("h", 5)),
    # the environment only fills in what the command line left out
    ((None, None, None), {"env_host": "e", "env_port": 6}, ("e", 6)),
    ((None, None, None), {"env_host": "e:6"}, ("e", 6)),
    (("h:5", None, None), {"env_host": "e", "env_port": 6}, ("h", 5)),
    (("h", None, None, "5"), {"env_port": 6}, ("h", 5)),
    ((None, None, 5), {"env_host": "e:6"}, ("e", 5)),
    ((":5", None, None), {"env_host": "e", "env_port": 6}, ("e", 5)),
])
def test_parse_target_port_arg_url_env(args, kw, expected):
    assert parse_target(*args, **kw) == expected


@pytest.mark.parametrize("args,kw,message", [
    (("h:5", None, None, "6"), {}, "two different ports given: h:5 and 6"),
    (("h", None, 5, "6"), {}, "two different ports given: 6 and --port 5"),
    (("chatpair://h:5", None, 6), {}, "two different ports given: 5 and --port 6"),
    (("chatpair://h", "g", None), {}, "two different hosts given: h and --host g"),
    (("h", None, None, "x"), {}, "bad port in 'x'"),
    (("h", None, None, "0"), {}, "bad port in '0'"),
    ((None, None, None, "5"), {}, "a PORT argument needs a HOST"),
    (("http://h:5", None, None), {}, "the only scheme is chatpair://"),
    (("chatpair://u@h:5", None, None), {}, "expected chatpair://HOST[:PORT]"),
    (("chatpair://h:5/room", None, None), {}, "expected chatpair://HOST[:PORT]"),
    (("chatpair://h:x", None, None), {}, "bad port"),
    ((None, None, None), {"env_host": "e:5", "env_port": 6},
     "two different ports given: CHATPAIR_CLIENT_HOST=...:5 and CHATPAIR_CLIENT_PORT=6"),
])
def test_parse_target_port_arg_url_conflicts(args, kw, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_target(*args, **kw)


@pytest.fixture
def run_cli(monkeypatch):
    """Invoke ``chatpair client`` in-process; return (result, ClientConfig it would connect with)."""
    from click.testing import CliRunner

    import chatpair.client
    from chatpair.cli import cli

    seen: list = []
    monkeypatch.setattr(chatpair.client, "run_client", lambda config, **kw: seen.append((config, kw)) or 0)
    for var in [v for v in os.environ if v.startswith("CHATPAIR_")]:
        monkeypatch.delenv(var)

    def run(*args: str, env: dict | None = None):
        result = CliRunner().invoke(cli, ["client", *args], env=env)
        return result, (seen[-1] if seen and result.exit_code == 0 else None)

    return run


@pytest.mark.parametrize("args,env,expected", [
    (("example.org", "9000"), {}, ("example.org", 9000)),
    (("chatpair://[::1]:9000",), {}, ("::1", 9000)),
    (("chatpair://example.org",), {}, ("example.org", 7878)),
    ((), {"CHATPAIR_CLIENT_HOST": "e", "CHATPAIR_CLIENT_PORT": "6"}, ("e", 6)),
    ((), {"CHATPAIR_CLIENT_HOST": "chatpair://e:6"}, ("e", 6)),
    (("h", "5"), {"CHATPAIR_CLIENT_HOST": "e", "CHATPAIR_CLIENT_PORT": "6"}, ("h", 5)),  # command line wins
    (("--port", "5"), {"CHATPAIR_CLIENT_HOST": "e:6"}, ("e", 5)),
    (("h:5",), {"CHATPAIR_CLIENT_PORT": "6"}, ("h", 5)),
    # the server's variables never reach the client
    ((), {"CHATPAIR_PORT": "6", "CHATPAIR_HOST": "0.0.0.0"}, ("127.0.0.1", 7878)),
    (("h",), {"CHATPAIR_PORT": "6"}, ("h", 7878)),
])
def test_cli_client_address(run_cli, args, env, expected):
    result, (config, _) = run_cli(*args, env=env)
    assert result.exit_code == 0, result.output
    assert (config.host, config.port) == expected


def test_cli_client_env_for_every_option(run_cli):
    env = {"CHATPAIR_CLIENT_NAME": "envname", "CHATPAIR_CLIENT_ROOM": "lab", "CHATPAIR_CLIENT_JSON": "1",
           "CHATPAIR_CLIENT_LOG": "t.log", "CHATPAIR_CLIENT_TLS": "true", "CHATPAIR_CLIENT_CAFILE": "ca.pem",
           "CHATPAIR_CLIENT_TIMEOUT": "2.5", "CHATPAIR_CLIENT_NO_COLOR": "1", "CHATPAIR_CLIENT_NO_RECONNECT": "1",
           "CHATPAIR_CLIENT_FINGERPRINT": "SHA256:" + "ab" * 32,
           "CHATPAIR_NAME": "server-ish", "CHATPAIR_TIMEOUT": "99"}
    result, (config, kw) = run_cli(env=env)
    assert result.exit_code == 0, result.output
    assert (config.name, config.room, config.tls, config.cafile, config.timeout) == ("envname", "lab", True,
                                                                                     "ca.pem", 2.5)
    assert config.fingerprint == bytes.fromhex("ab" * 32)
    assert kw == {"json_mode": True, "log_path": "t.log", "color": False, "reconnect": False}
    result, (config, kw) = run_cli("--name", "cli", "-r", "other", "--timeout", "3", env=env)
    assert (config.name, config.room, config.timeout) == ("cli", "other", 3.0)  # command line beats env
    result, (config, kw) = run_cli(env={"CHATPAIR_CLIENT_JSON": "0", "CHATPAIR_CLIENT_NO_RECONNECT": "false"})
    assert kw["json_mode"] is False and kw["reconnect"] is True


@pytest.mark.parametrize("args,env,message", [
    (("h:5", "6"), {}, "two different ports given: h:5 and 6"),
    (("h", "6", "--port", "5"), {}, "two different ports given: 6 and --port 5"),
    (("chatpair://h:5", "-p", "6"), {}, "two different ports given: 5 and --port 6"),
    (("h", "nope"), {}, "bad port in 'nope'"),
    ((), {"CHATPAIR_CLIENT_HOST": "e:5", "CHATPAIR_CLIENT_PORT": "6"}, "CHATPAIR_CLIENT_PORT=6"),
])
def test_cli_client_address_conflicts(run_cli, args, env, message):
    result, config = run_cli(*args, env=env)
    assert config is None
    assert isinstance(result.exception, ConfigError) and message in str(result.exception)


def test_cli_client_help_shows_envvars(run_cli):
    result, _ = run_cli("--help")
    text = " ".join(result.output.split())
    assert "[HOST[:PORT] [PORT]]" in text and "chatpair://" in text
    for var in ("HOST", "PORT", "NAME", "ROOM", "JSON", "LOG", "TLS", "CAFILE", "FINGERPRINT", "TIMEOUT",
                "NO_COLOR", "NO_RECONNECT"):
        assert f"CHATPAIR_CLIENT_{var}" in text


def test_label_brackets_ipv6():
    assert ClientConfig(name="a", host="::1", port=5).label == "[::1]:5"


@pytest.mark.parametrize("raw,name", [
    ("alice", "alice"), ("Dr. Who", "Dr.Who"), ("jo@host", "johost"), ("", "guest"), ("@@", "guest"),
    ("x" * 40, "x" * 32), ("zoë_1", "zoë_1"),
])
def test_make_valid_name(raw, name):
    assert make_valid_name(raw) == name


def test_parse_fingerprint_forms():
    digest = bytes(range(32))
    hexed = digest.hex()
    colons = ":".join(hexed[i:i + 2] for i in range(0, 64, 2)).upper()
    import base64

    b64 = base64.b64encode(digest).decode().rstrip("=")
    for text in (f"SHA256:{hexed}", hexed, f"sha256:{colons}", f"SHA256:{b64}"):
        assert parse_fingerprint(text) == digest
    assert format_fingerprint(digest) == f"SHA256:{hexed}"
    for bad in ("SHA256:abcd", "SHA256:" + "zz" * 32, ""):
        with pytest.raises(ConfigError):
            parse_fingerprint(bad)


@pytest.mark.parametrize("line,kind,text", [
    ("hi", "msg", "hi"), ("//next", "msg", "/next"), ("/next", "next", ""), ("/QUIT", "quit", ""),
    ("/help", "help", ""), ("/ping", "ping", ""), ("/nope x", "unknown", "/nope"), ("   ", "empty", ""),
    ("/next please", "unknown", "/next"),
])
def test_parse_input(line, kind, text):
    cmd = parse_input(line)
    assert (cmd.kind, cmd.text) == (kind, text)


def test_split_message_keeps_characters_whole():
    text = "aé😀" * 50
    pieces = split_message(text, 7)
    assert "".join(pieces) == text
    assert all(1 <= len(p.encode()) <= 7 for p in pieces)
    assert split_message("short", 100) == ["short"]


def test_line_reader_split_anywhere():
    data = "héllo\r\nwörld\nlast".encode()
    for cut in range(len(data) + 1):
        reader = LineReader()
        lines = reader.feed(data[:cut]) + reader.feed(data[cut:]) + reader.feed(b"")
        assert lines == ["héllo", "wörld", "last"], cut
    assert LineReader().feed(b"\xffbad\n") == ["\ufffdbad"]


def test_presenter_sanitizes_names_and_text():
    p = Presenter("me")
    lines = p.lines(Paired("b\x1bob", None))
    assert lines[0].plain() == "* paired with b^[ob"
    shown = p.lines(Message("b\x1bob", HOSTILE + "\nsecond"))
    assert len(shown) == 2
    for line in shown:
        text = line.plain()
        assert not any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in text), repr(text)
        assert "\u202e" not in text
    assert shown[1].plain() == "b^[ob: second"
    # PEER_LEFT then WAITING: one line, like the server's line mode.
    assert [x.plain() for x in p.lines(PeerLeft("bob", "bye"))] == ["* bob left (bye); waiting for a partner"]
    assert p.lines(Waiting(None)) == []
    assert [x.plain() for x in p.lines(Waiting("r1"))] == ["* waiting for a partner in room r1"]
    assert p.lines(ServerError("shutdown", "bye\x07"))[0].plain() == "* error: bye^G"
    assert p.lines(Closed("gone"))[0].kind == "error"


def test_event_json_escapes_controls():
    text = json.dumps(event_json(Message("bob", HOSTILE)))
    assert all(0x20 <= ord(c) < 0x7F for c in text)
    assert json.loads(text)["text"] == HOSTILE  # bots get the real text


@pytest.mark.parametrize("ch,width", [("a", 1), ("é", 1), ("\u0301", 0), ("你", 2), ("😀", 2),
                                      ("\u200d", 0), ("\ufe0f", 0), ("\x1b", 0), ("ｱ", 1)])
def test_char_width(ch, width):
    assert char_width(ch) == width


def test_wrap_by_cells():
    assert wrap("hello world", 5) == ["hello", "world"]
    assert wrap("你好你好你", 4) == ["你好", "你好", "你"]
    assert all(str_width(r) <= 5 for r in wrap("a你好😀b c d 😀😀😀", 5))
    assert wrap("", 10) == [""]
    assert wrap("abcdefgh", 3) == ["abc", "def", "gh"]
    assert clip("你好", 3) == "你"


def test_input_view_scrolls_only_when_needed():
    chars = list("abcdefghij")
    offset, col = input_view(chars, 10, 5, 0)
    assert (offset, col) == (6, 4)
    assert input_view(chars, 8, 5, offset) == (6, 2)  # moving left inside the view does not scroll
    assert input_view(chars, 2, 5, offset) == (2, 0)
    assert input_view(list("你好你好"), 4, 5, 0) == (2, 4)


def test_input_line_editing():
    line = InputLine()
    line.insert("hello world")
    line.kill_word()
    assert line.text == "hello "
    line.insert("wörld\x1b[31m")
    assert line.text == "hello wörld[31m"  # controls never enter the line
    line.set_text("hello")
    line.home()
    line.delete()
    line.end()
    line.backspace()
    assert line.text == "ell"
    line.left()
    line.insert("😀")
    assert line.text == "el😀l"
    line.kill_to_start()
    assert (line.text, line.cursor) == ("l", 0)
    line.set_text("e\u0301x")  # combining accent: one step over "é"
    line.home()
    line.right()
    assert line.cursor == 2
    line.backspace()
    assert line.text == "x"


def test_input_line_history():
    line = InputLine()
    for text in ("one", "two"):
        line.insert(text)
        assert line.take() == text
    line.insert("draft")
    line.history_up()
    assert line.text == "two"
    line.history_up()
    line.history_up()
    assert line.text == "one"
    line.history_down()
    line.history_down()
    assert line.text == "draft"


def test_chat_log_layout_and_scroll():
    log = ChatLog()
    p = Presenter("me")
    p.lines(Paired("bob", None))
    for i in range(30):
        for line in p.lines(Message("bob", f"line {i} " + "x" * 30)):
            log.add(line)
    rows = log.rows(20, 5)
    assert len(rows) == 5 and all(str_width(r.text) <= 20 for r in rows)
    assert rows[-1].text.endswith("x")
    log.scroll = 10_000
    top = log.rows(20, 5)
    assert top[0].text.startswith("bob: line 0") and top[0].name_len == 5


# ---------------------------------------------------------------------------
# Pipe mode against a real server
# ---------------------------------------------------------------------------


class Proc:
    """A ``chatpair client`` subprocess with pipes; stdout read with deadlines."""

    def __init__(self, *args: str, stdin_data: bytes | None = None, env: dict | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "chatpair", "client", *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
            env={**os.environ, "NO_COLOR": "", **(env or {})},
        )
        self.out = b""
        if stdin_data is not None:
            assert self.proc.stdin is not None
            self.proc.stdin.write(stdin_data)
            self.proc.stdin.flush()

    def write(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def close_stdin(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.stdin = None  # so communicate() does not flush a closed pipe

    def wait_for(self, needle: bytes, timeout: float = 10.0) -> bytes:
        """Read stdout until ``needle`` shows up; return everything read so far."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while needle not in self.out:
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    raise AssertionError(f"{needle!r} not in output within {timeout}s: {self.out!r}")
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise AssertionError(f"output ended without {needle!r}: {self.out!r} {self.stderr()!r}")
                self.out += chunk
        return self.out

    def finish(self, timeout: float = 10.0) -> tuple[int, bytes, bytes]:
        """Wait for exit; return (code, all stdout, stderr)."""
        try:
            rest, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rest, err = self.proc.communicate()
            raise AssertionError(f"client did not exit: {self.out!r} {err!r}")
        self.out += rest
        return self.proc.returncode, self.out, err

    def stderr(self) -> bytes:
        return b""

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        if self.proc.stdin is not None:
            self.proc.stdin.close()
            self.proc.stdin = None
        self.proc.communicate()


def pair_raw(raw_client, port: int, name: str = "raw", room: str | None = None):
    raw = raw_client(port)
    raw.hello(name, room)
    raw.expect(WELCOME)
    raw.expect(WAITING)
    return raw


def fill_room(raw_client, port: int, room: str) -> tuple:
    """Two raw clients paired in ``room``: it is full while they chat."""
    first = pair_raw(raw_client, port, "ann", room)
    second = pair_raw(raw_client, port, "ben", room)
    second.expect(PAIRED)
    return first, second


def assert_terminal_safe(data: bytes) -> None:
    text = data.decode("utf-8")
    bad = [c for c in text if (ord(c) < 0x20 and c not in "\n\t") or 0x7F <= ord(c) < 0xA0
           or c in "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"]
    assert not bad, f"control characters reached stdout: {bad!r}"


def test_pipe_delivers_and_sanitizes(server, raw_client, clients):
    raw = pair_raw(raw_client, server.port)
    me = clients("--port", str(server.port), "--name", "alice")
    assert raw.expect(PAIRED)["peer"] == "alice"
    me.wait_for(b"* paired with raw\n")
    me.write("hi there\n//slash\n/bogus\n\nzoë\n".encode())
    assert raw.expect(MSG) == b"hi there"
    assert raw.expect(MSG) == b"/slash"  # /bogus is not sent, the empty line neither
    assert raw.expect(MSG) == "zoë".encode()
    raw.send_frame(MSG, (HOSTILE + "\nline two").encode())
    out = me.wait_for(b"raw: line two\n")
    assert b"unknown command /bogus" in out
    assert_terminal_safe(out)
    assert b"raw: ^[[2J^[[31mred^G ^[]0;pwned^G" in out
    assert "\\x9b31m".encode() in out and b"<U+202E>" in out
    raw.send_frame(PING, b"tok")  # the client answers the server's PING
    assert raw.expect(PONG) == b"tok"
    me.close_stdin()
    code, out, err = me.finish()
    assert (code, err) == (0, b"")
    assert raw.expect(PEER_LEFT) == {"peer": "alice", "reason": "bye"}


def test_pipe_holds_lines_until_paired_then_bye(server, raw_client, clients):
    # Input ends before any partner exists: the line is held, sent once paired, then BYE.
    me = clients("127.0.0.1:%d" % server.port, "--name", "early", stdin_data=b"hi\n/ping\n")
    me.close_stdin()
    me.wait_for(b"* waiting for a partner\n")
    raw = raw_client(server.port)
    raw.hello("late")
    raw.expect(WELCOME)
    raw.expect(WAITING)
    raw.expect(PAIRED)
    assert raw.expect(MSG) == b"hi"
    code, out, _ = me.finish()
    assert code == 0
    assert b"* round trip " in out
    assert raw.expect(PEER_LEFT)["reason"] == "bye"


def test_two_pipe_clients_script(server, clients):
    """``printf 'hi\\n' | chatpair client --name a`` reaches a second client."""
    b = clients("--port", str(server.port), "--name", "b")
    b.wait_for(b"waiting for a partner")
    a = clients("--port", str(server.port), "--name", "a", stdin_data=b"hi\n")
    a.close_stdin()
    assert a.finish()[0] == 0
    out = b.wait_for(b"* a left (bye); waiting for a partner\n")
    assert b"* paired with a\na: hi\n" in out


def test_pipe_exit_0_on_eof_unpaired(server, clients):
    me = clients("--port", str(server.port), "--name", "solo", stdin_data=b"")
    me.close_stdin()
    code, out, err = me.finish()
    assert (code, err) == (0, b"")  # nothing held: no reason to wait for a partner


def test_address_forms_reach_a_real_server(server, clients):
    """``HOST PORT`` and ``chatpair://``; the server's CHATPAIR_PORT/HOST (here: wrong) are ignored."""
    server_env = {"CHATPAIR_PORT": "1", "CHATPAIR_HOST": "192.0.2.1"}
    a = clients("127.0.0.1", str(server.port), "--name", "a", env=server_env)
    b = clients(f"chatpair://127.0.0.1:{server.port}", "--name", "b", env=server_env)
    a.wait_for(b"* paired with b")
    b.wait_for(b"* paired with a")
    c = clients("--name", "c", stdin_data=b"", env={**server_env, "CHATPAIR_CLIENT_HOST": "127.0.0.1",
                                                    "CHATPAIR_CLIENT_PORT": str(server.port)})
    c.close_stdin()
    assert c.finish()[0] == 0
    for proc in (a, b):
        proc.close_stdin()
        assert proc.finish()[0] == 0


def test_pipe_next_and_peer_left(server, raw_client, clients):
    raw = pair_raw(raw_client, server.port)
    me = clients("--port", str(server.port), "--name", "alice", "--log", "/dev/null")
    raw.expect(PAIRED)
    me.wait_for(b"* paired with raw\n")
    me.write(b"/next\n")
    assert raw.expect(PEER_LEFT) == {"peer": "alice", "reason": "next"}
    me.wait_for(b"* you left raw; waiting for a partner\n")
    assert me.out.count(b"waiting for a partner") == 2  # the WAITING after /next is not repeated


def test_json_mode(server, raw_client, clients, tmp_path):
    log = tmp_path / "chat.log"
    raw = pair_raw(raw_client, server.port, name="bot")
    me = clients("--port", str(server.port), "--name", "alice", "--json", "--log", str(log))
    raw.expect(PAIRED)
    me.wait_for(b'"paired"')
    raw.send_frame(MSG, "x\x1b]0;t\x07 é".encode())
    me.wait_for(b'"message"')
    me.write(b"hello\n")
    assert raw.expect(MSG) == b"hello"
    me.close_stdin()
    code, out, err = me.finish()
    assert code == 0, err
    assert_terminal_safe(out)
    events = [json.loads(line) for line in out.decode().splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds[:3] == ["welcome", "waiting", "paired"]
    assert {"event": "message", "from": "bot", "text": "x\x1b]0;t\x07 é"} in events
    assert {"event": "sent", "text": "hello"} in events and kinds[-1] == "bye"
    transcript = log.read_text()
    assert "* paired with bot" in transcript and "bot: x^[]0;t^G é" in transcript
    assert "alice: hello" in transcript and transcript[:4].isdigit()  # timestamped


def test_server_error_ends_pipe_mode(start_server, clients):
    server = start_server()
    me = clients("--port", str(server.port), "--name", "alice")
    me.wait_for(b"waiting for a partner")
    server.stop()
    code, out, err = me.finish()
    assert code == 3
    assert b"shutting down" not in out  # said once: the error line on stderr
    assert err.decode().count("\n") == 1 and f"127.0.0.1:{server.port}".encode() in err
    assert "the server is shutting down" in err.decode()


# ---------------------------------------------------------------------------
# One clear line on stderr, never a traceback
# ---------------------------------------------------------------------------


def run_client(*args: str, timeout: float = 15.0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "chatpair", "client", *args], input=b"",
                          capture_output=True, timeout=timeout, cwd=ROOT)


def assert_one_line(result: subprocess.CompletedProcess, *needles: str) -> str:
    err = result.stderr.decode()
    assert result.returncode != 0
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert err.startswith("chatpair: ")
    for needle in needles:
        assert needle in err, err
    return err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_error_nothing_listening():
    port = free_port()
    result = run_client("--port", str(port), "--name", "a")
    assert_one_line(result, f"cannot connect to 127.0.0.1:{port}: connection refused")
    assert result.returncode == 2


class FakeServer:
    """A listening socket that answers every connection with fixed bytes (or nothing)."""

    def __init__(self, greeting: bytes | None) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.greeting = greeting
        self.conns: list[socket.socket] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        self.sock.settimeout(0.05)
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.conns.append(conn)
            if self.greeting is not None:
                conn.sendall(self.greeting)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        for conn in self.conns:
            conn.close()
        self.sock.close()


@pytest.mark.parametrize("greeting", [b"SSH-2.0-OpenSSH_9.6\r\n", b"HTTP/1.1 400 Bad Request\r\n\r\n",
                                      b"\x00\x00\x00"])
def test_error_not_chatpair(greeting):
    fake = FakeServer(greeting)
    try:
        result = run_client("--port", str(fake.port), "--name", "a")
    finally:
        fake.close()
    err = assert_one_line(result, f"127.0.0.1:{fake.port} is ", "not a chatpair server (it said: ")
    assert ("an HTTP server" in err) == greeting.startswith(b"HTTP/") and "--tls" not in err
    assert result.returncode == 2


def test_error_silent_port_times_out():
    fake = FakeServer(None)
    try:
        result = run_client("--port", str(fake.port), "--name", "a", "--timeout", "0.5")
    finally:
        fake.close()
    assert_one_line(result, f"127.0.0.1:{fake.port} sent no chatpair banner", "not a chatpair server")


def test_error_bad_name_and_room(server):
    result = run_client("--port", str(server.port), "--name", "no spaces")
    assert_one_line(result, f"127.0.0.1:{server.port} refused: bad name")
    assert result.returncode == 3
    result = run_client("--port", str(server.port), "--name", "ok", "--room", "a/b")
    assert_one_line(result, "bad room")


def test_error_bad_options():
    assert_one_line(run_client("--fingerprint", "SHA256:nothex", "--name", "a"), "bad fingerprint")
    assert_one_line(run_client("host:1:2:x", "--port", "5", "--name", "a"))


# ---------------------------------------------------------------------------
# TLS against the real server (--tls-cert), with certificates made by openssl
# ---------------------------------------------------------------------------


def _server_has_tls() -> bool:
    out = subprocess.run([sys.executable, "-m", "chatpair", "server", "--help"], capture_output=True,
                         cwd=ROOT).stdout
    return b"--tls-cert" in out


needs_tls = pytest.mark.skipif(shutil.which("openssl") is None or not _server_has_tls(),
                               reason="needs openssl and a server with --tls-cert")


def make_cert(directory: Path, name: str, san: str) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256", "-days", "2",
         "-subj", f"/CN={name}", "-addext", f"subjectAltName={san}", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=30,
    )
    return cert, key


@pytest.fixture
def tls_server_factory(start_server):
    def start(cert: Path, key: Path) -> ServerProcess:
        return start_server("--tls-cert", str(cert), "--tls-key", str(key))

    return start


def cert_fingerprint(cert: Path) -> str:
    import hashlib
    import ssl

    der = ssl.PEM_cert_to_DER_cert(cert.read_text())
    return "SHA256:" + hashlib.sha256(der).hexdigest()


@needs_tls
def test_tls(tls_server_factory, clients, tmp_path):
    cert, key = make_cert(tmp_path, "good", "IP:127.0.0.1,DNS:localhost")
    server = tls_server_factory(cert, key)
    port = str(server.port)
    label = f"127.0.0.1:{server.port}"
    fp = cert_fingerprint(cert)

    # Verified against --cafile, then pinned: both pair and chat.
    a = clients("--port", port, "--name", "a", "--tls", "--cafile", str(cert))
    a.wait_for(b"waiting for a partner")
    b = clients("--port", port, "--name", "b", "--fingerprint", fp.replace("SHA256:", "sha256:"))
    b.wait_for(b"* paired with a")
    a.write(b"over tls\n")
    b.wait_for(b"a: over tls\n")
    a.close_stdin()
    assert a.finish()[0] == 0

    # Not trusted: the error names host:port and shows the fingerprint to pin.
    assert_one_line(run_client("--port", port, "--name", "c", "--tls"),
                    f"TLS certificate of {label} not trusted", fp)
    wrong = "SHA256:" + "00" * 32
    assert_one_line(run_client("--port", port, "--name", "c", "--fingerprint", wrong),
                    f"TLS certificate of {label} does not match the pinned fingerprint", fp)
    # A plain client on the TLS port never sees a banner.
    assert_one_line(run_client("--port", port, "--name", "c", "--timeout", "0.5"), label, "--tls")


@needs_tls
def test_tls_wrong_host_and_plain_port(tls_server_factory, server, tmp_path):
    cert, key = make_cert(tmp_path, "other", "DNS:example.com")
    tls_server = tls_server_factory(cert, key)
    assert_one_line(run_client("--port", str(tls_server.port), "--name", "c", "--tls", "--cafile", str(cert)),
                    f"TLS certificate of 127.0.0.1:{tls_server.port} not trusted", "mismatch")
    # TLS client on a plain chatpair port.
    assert_one_line(run_client("--port", str(server.port), "--name", "c", "--tls"),
                    f"TLS handshake with 127.0.0.1:{server.port} failed")


def test_two_pipe_clients_flooding_each_other(server, clients, tmp_path):
    """Both send 2 MB at once. Sends never block reads, so neither client can
    stall the other through the server; every line arrives, in order."""
    lines = "".join(f"{i:05d} {'x' * 1000}\n" for i in range(2000)).encode()
    big = tmp_path / "big.txt"
    big.write_bytes(lines)
    b = clients("--port", str(server.port), "--name", "b")
    b.wait_for(b"waiting for a partner")
    with open(big, "rb") as stdin:
        a = subprocess.Popen([sys.executable, "-m", "chatpair", "client", "--port", str(server.port), "--name", "a"],
                             stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    def feed_b() -> None:
        try:
            b.write(lines)
        except (BrokenPipeError, ValueError, OSError):
            pass  # b was stopped at the end of the test

    writer = threading.Thread(target=feed_b)  # b may pause reading its stdin: do not block the test

    writer.start()
    try:
        a_out, a_err = a.communicate(timeout=40)  # reading a's stdout meanwhile, so a never blocks on it
        assert (a.returncode, a_err) == (0, b"")
        out = b.wait_for(b"a: 01999 ", timeout=40)
    finally:
        if a.poll() is None:
            a.kill()
        b.proc.kill()
        writer.join(10)
    got = [line[3:8] for line in out.decode().splitlines() if line.startswith("a: ")]
    assert got == [f"{i:05d}" for i in range(2000)]
    from_b = [line[3:8] for line in a_out.decode().splitlines() if line.startswith("b: ")]
    assert from_b == [f"{i:05d}" for i in range(len(from_b))]  # a prefix, in order: a left when done
