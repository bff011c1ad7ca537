"""Seeded, repeatable fuzzing: of the sans-IO parsers, and (briefly) of a live server.

(a) Without sockets. Random frames and lines, and valid ones mutated (bits
    flipped, cut short, length field or type changed, bytes spliced), are fed
    to every parser a client can reach - FrameDecoder, LineDecoder, the
    handshake (``chatpair.server.handshake.read_hello``, sans-IO),
    ``parse_hello``, ``parse_name_line``, ``check_client_frame``,
    ``parse_client_line`` - whole, split at every byte, and one byte at a
    time. Only ProtocolError may escape, and the outcome must not depend on
    how the bytes were split. The server's hot path, ``ConnLoop.scan_frames``
    (runs of MSG frames checked and forwarded as one slice), is checked
    against FrameDecoder + check_client_frame as an oracle on the same inputs.

(b) Against a live server: ~50 connections sending random bytes and mutated
    frames (the generators of ``scripts/fuzz.py``, fixed seed), then two honest
    clients must still pair and chat, and the listener must be the same
    process (not crashed and restarted). ``scripts/fuzz.py`` runs the same
    thing for as long as you like.

A failure prints the seed and the input (``repr``), so it can be replayed.
"""

from __future__ import annotations

import importlib.util
import json
import random
import subprocess
import sys
import time

import pytest

from conftest import ROOT, pid_alive

from chatpair.server.conn import Conn
from chatpair.server.states import Mode
from chatpair.server.render import event_bytes, line_msg_bytes
from chatpair.server.handshake import read_hello
from chatpair.server.config import Limits
from chatpair.server.loop import ConnLoop
from chatpair.proto import (
    HANDSHAKE_MAX,
    NEED_DATA,
    EndOfStream,
    ErrorCode,
    Frame,
    FrameDecoder,
    FrameType,
    Hello,
    LineDecoder,
    ProtocolError,
    check_client_frame,
    encode_frame,
    parse_client_line,
    parse_hello,
    parse_name_line,
    sanitize,
    sanitize_name,
)

SEED = 20_240_611


def _load_fuzz_script():
    spec = importlib.util.spec_from_file_location("chatpair_fuzz_script", ROOT / "scripts" / "fuzz.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


fuzz = _load_fuzz_script()


# =====================================================================================
# Inputs
# =====================================================================================


def random_frame(rng: random.Random) -> bytes:
    """Any type (reserved and server-only ones too), any payload, a correct length."""
    ftype = rng.choice(fuzz.ALL_TYPES)
    payload = rng.randbytes(rng.choice([0, 1, 2, 5, 63, 64, 65, 127, 128, 200]))
    return encode_frame(ftype, payload)


def frame_inputs(rng: random.Random, n: int) -> list[bytes]:
    """Streams of frames: valid, random, and valid ones mutated 1-3 times."""
    out = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(1, 6)):
            r = rng.random()
            if r < 0.4:
                part = fuzz.valid_frame(rng)
            elif r < 0.6:
                part = random_frame(rng)
            elif r < 0.7:
                part = fuzz.random_hello(rng)
            else:
                part = fuzz.valid_frame(rng) if rng.random() < 0.7 else fuzz.random_hello(rng)
                for _ in range(rng.randint(1, 3)):
                    part = fuzz.mutate(rng, part)
            parts.append(part)
        data = b"".join(parts)
        if rng.random() < 0.2:
            data = fuzz.mutate(rng, data)
        out.append(data[:700])
    # Plain random bytes, too (mostly rejected at the first header).
    out += [rng.randbytes(rng.randint(0, 40)) for _ in range(n // 5)]
    return out


def line_inputs(rng: random.Random, n: int) -> list[bytes]:
    out = []
    for _ in range(n):
        data = b"".join(fuzz.garbage_line(rng)[:300] for _ in range(rng.randint(1, 4)))
        if rng.random() < 0.5:
            data = fuzz.mutate(rng, data)
        out.append(data[:600])
    return out


def splits(data: bytes):
    """Ways of chunking ``data``: whole, at every single split point, and byte by byte."""
    yield [data]
    for i in range(1, len(data)):
        yield [data[:i], data[i:]]
    if len(data) > 1:
        yield [data[i:i + 1] for i in range(len(data))]


# =====================================================================================
# (a) FrameDecoder
# =====================================================================================


def run_frame_decoder(chunks: list[bytes], max_frame: int) -> tuple[list[Frame], str | None, bool]:
    """Feed ``chunks`` then EOF; (frames, error code or None, clean end of stream)."""
    dec = FrameDecoder(max_frame)
    frames: list[Frame] = []
    try:
        for chunk in [*chunks, b""]:
            dec.feed(chunk)
            while True:
                ev = dec.next_event()
                if ev is NEED_DATA:
                    break
                if isinstance(ev, EndOfStream):
                    return frames, None, True
                assert isinstance(ev, Frame)
                frames.append(ev)
    except ProtocolError as err:
        return frames, err.code, False
    raise AssertionError("EOF was fed but neither EndOfStream nor an error came out")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("max_frame", [HANDSHAKE_MAX, 64, 65_536])
def test_frame_decoder_fuzz(max_frame):
    rng = random.Random(SEED + max_frame)
    for data in frame_inputs(rng, 150):
        results = set()
        for chunks in splits(data):
            try:
                frames, code, clean = run_frame_decoder(chunks, max_frame)
            except ProtocolError:
                raise
            except Exception as err:  # noqa: BLE001 - only ProtocolError may escape
                raise AssertionError(f"seed {SEED + max_frame}: {type(err).__name__}: {err} on {data!r}") from err
            results.add((tuple((f.type, f.payload) for f in frames), code, clean))
            # Every frame is one the wire really carried, in order, within the limit.
            consumed = b"".join(encode_frame(f.type, f.payload) for f in frames)
            assert data.startswith(consumed), data
            assert all(1 <= len(f.payload) + 1 <= max_frame for f in frames)
            assert code in (None, ErrorCode.FRAME_TOO_LARGE.value, ErrorCode.BAD_FRAME.value)
            assert clean == (code is None) and (not clean or consumed == data)
        assert len(results) == 1, f"the outcome depends on how the bytes were split: {data!r}: {results}"


# =====================================================================================
# (a) LineDecoder
# =====================================================================================


def run_line_decoder(chunks: list[bytes], max_line: int) -> tuple[list[str], str | None]:
    dec = LineDecoder(max_line)
    lines: list[str] = []
    try:
        for chunk in [*chunks, b""]:
            dec.feed(chunk)
            while True:
                item = dec.next_line()
                if item is NEED_DATA:
                    break
                if isinstance(item, EndOfStream):
                    return lines, None
                assert isinstance(item, str)
                lines.append(item)
    except ProtocolError as err:
        return lines, err.code
    raise AssertionError("EOF was fed but neither EndOfStream nor an error came out")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("max_line", [8, 40, HANDSHAKE_MAX])
def test_line_decoder_fuzz(max_line):
    rng = random.Random(SEED + max_line)
    for data in line_inputs(rng, 150):
        results = set()
        for chunks in splits(data):
            try:
                lines, code = run_line_decoder(chunks, max_line)
            except ProtocolError:
                raise
            except Exception as err:  # noqa: BLE001
                raise AssertionError(f"seed {SEED + max_line}: {type(err).__name__}: {err} on {data!r}") from err
            results.add((tuple(lines), code))
            assert code in (None, ErrorCode.FRAME_TOO_LARGE.value)
            for line in lines:
                assert "\n" not in line
                # Telnet IAC (0xFF) sequences never reach a line.
                assert "\xff" not in line
            for line in lines:
                cmd = parse_client_line(line)  # never raises
                assert cmd.kind.value in ("msg", "next", "quit", "help", "unknown", "empty")
        assert len(results) == 1, f"the outcome depends on how the bytes were split: {data!r}: {results}"


# =====================================================================================
# (a) The handshake, as the listener runs it
# =====================================================================================


def run_handshake(chunks: list[bytes]) -> tuple[str, object]:
    """What the listener does with each read of a handshake, without a listener or a socket."""
    decoder = None
    for chunk in chunks:
        if not chunk:
            continue
        if decoder is None:
            decoder = FrameDecoder(HANDSHAKE_MAX) if chunk[0] == 0 else LineDecoder(HANDSHAKE_MAX)
        decoder.feed(chunk)
        try:
            hello = read_hello(decoder)
        except ProtocolError as err:
            return "error", err.code
        if hello is not None:
            assert isinstance(hello, Hello)
            return "hello", (hello.name, hello.room)
    return "waiting", None


def handshake_inputs(rng: random.Random, n: int) -> list[bytes]:
    out = []
    for i in range(n):
        r = rng.random()
        if r < 0.35:
            data = fuzz.random_hello(rng)
        elif r < 0.6:
            data = fuzz.hello(f"h{i}", rng.choice([None, "room", "r" * 64, "r" * 65]))
            for _ in range(rng.randint(1, 3)):
                data = fuzz.mutate(rng, data)
        elif r < 0.85:
            data = fuzz.garbage_line(rng)[:200]
            if rng.random() < 0.5:
                data = fuzz.mutate(rng, data)
        else:
            data = rng.randbytes(rng.randint(1, 60))
        out.append(data + (fuzz.valid_frame(rng) if rng.random() < 0.3 else b""))
    return out


@pytest.mark.timeout(60)
def test_handshake_fuzz():
    rng = random.Random(SEED)
    seen = set()
    for data in handshake_inputs(rng, 400):
        results = set()
        for chunks in splits(data):
            try:
                results.add(run_handshake(chunks))
            except ProtocolError:
                raise
            except Exception as err:  # noqa: BLE001
                raise AssertionError(f"seed {SEED}: {type(err).__name__}: {err} on {data!r}") from err
        assert len(results) == 1, f"the outcome depends on how the bytes were split: {data!r}: {results}"
        outcome, detail = results.pop()
        seen.add(outcome)
        if outcome == "hello":
            name, room = detail  # type: ignore[misc]
            # A name or room the server accepts can never carry a control or bidi character.
            assert sanitize_name(name) == name and (room is None or sanitize_name(room) == room)
        elif outcome == "error":
            assert detail in {c.value for c in ErrorCode}, detail
    assert seen == {"hello", "error", "waiting"}, f"the inputs did not reach every outcome: {seen}"


@pytest.mark.timeout(60)
def test_hello_and_line_parsers_fuzz():
    rng = random.Random(SEED)
    values = [None, True, False, 0, 1, 2, -1, 1.0, 2**70, "", "x", "a" * 32, "a" * 33, "r" * 64, "r" * 65,
              "Zoë", "名前", "a b", "a\tb", "a\nb", "\x1b[31m", "\u202e", "a\u200db", "١٢٣", "Ⅻ", "\u0301",
              [], {}, ["x"], {"x": 1}]
    for _ in range(3000):
        obj = {k: rng.choice(values) for k in rng.sample(["version", "name", "room", "extra"], rng.randint(0, 4))}
        if rng.random() < 0.5:
            obj["version"] = 1
        payload = json.dumps(obj).encode()
        if rng.random() < 0.3:
            payload = fuzz.mutate(rng, payload)
        for ftype in (FrameType.HELLO, rng.choice(fuzz.ALL_TYPES)):
            frame = Frame(ftype, payload)
            try:
                hello = parse_hello(frame)
            except ProtocolError as err:
                assert err.code in ("bad_hello", "unsupported_version"), err.code
            else:
                assert sanitize_name(hello.name) == hello.name
            try:
                check_client_frame(frame)
            except ProtocolError as err:
                assert err.code == "bad_frame"
        line = " ".join(str(v) for v in rng.sample(values, rng.randint(0, 3)))
        try:
            hello = parse_name_line(line)
        except ProtocolError as err:
            assert err.code == "bad_hello"
        else:
            assert sanitize_name(hello.name) == hello.name
        parse_client_line(line)


# =====================================================================================
# (a) Terminal injection (PROTOCOL.md section 5): nothing escapes sanitize()
# =====================================================================================


def _dangerous(ch: str) -> bool:
    cp = ord(ch)
    if ch in "\t\n":
        return False
    return (cp < 0x20 or 0x7F <= cp < 0xA0 or 0x202A <= cp <= 0x202E or 0x2066 <= cp <= 0x2069
            or cp in (0x2028, 0x2029))


@pytest.mark.timeout(60)
def test_sanitize_fuzz():
    rng = random.Random(SEED)
    for _ in range(3000):
        text = fuzz.random_text(rng, rng.randint(0, 60))
        text += "".join(chr(rng.randrange(0x110000)) for _ in range(rng.randint(0, 10)))
        text = "".join(c for c in text if not 0xD800 <= ord(c) < 0xE000)  # no lone surrogates on the wire
        clean = sanitize(text)
        assert not any(_dangerous(c) for c in clean), repr(clean)
        name = sanitize_name(text)
        assert not any(_dangerous(c) or c in "\t\n" for c in name), repr(name)
        # What a line-mode (netcat) client receives from a partner: one safe "name: " line per line.
        out = line_msg_bytes(text or "x", text or "x").decode()
        assert out.endswith("\n")
        assert not any(_dangerous(c) for c in out), repr(out)
        assert all(line.startswith(sanitize_name(text or "x") + ": ") for line in out[:-1].split("\n"))
        # ...and server notices about that partner.
        conn = Conn(_NoSocket(), 1, "fuzz", 0.0)
        conn.mode = Mode.LINE
        for ftype, obj in ((FrameType.PAIRED, {"peer": text, "room": None}),
                           (FrameType.PEER_LEFT, {"peer": text, "reason": "bye"}),
                           (FrameType.ERROR, {"code": "x", "message": text}),
                           (FrameType.NOTICE, {"code": "x", "message": text})):
            line = event_bytes(conn, ftype, obj).decode()
            assert line.count("\n") == 1 and line.endswith("\n"), repr(line)
            assert not any(_dangerous(c) for c in line), repr(line)


# =====================================================================================
# (a) The server's hot path against an oracle
# =====================================================================================


class _NoSocket:
    def fileno(self) -> int:
        return -1

    def close(self) -> None:
        pass


class RecordingLoop(ConnLoop):
    """A ConnLoop whose conn has no socket: records what scan_frames decides."""

    def __init__(self, max_frame: int) -> None:
        super().__init__(Limits(max_frame, 30.0, 90.0, 30.0))
        self.log: list[tuple] = []

    def on_msg_run(self, conn, view, start, end, count):
        pos = n = 0
        pos = start
        while pos < end:
            length = int.from_bytes(view[pos:pos + 4], "big")
            assert view[pos + 4] == FrameType.MSG
            self.log.append(("msg", bytes(view[pos + 5:pos + 4 + length])))
            pos += 4 + length
            n += 1
        assert pos == end and n == count, "a run's bounds or count are off"

    def on_next(self, conn):
        self.log.append(("next",))

    def on_bye(self, conn):
        self.log.append(("bye",))
        self.conns.discard(conn)

    def fail(self, conn, code, message, reason="error"):
        self.log.append(("error", code.value if isinstance(code, ErrorCode) else code))
        self.conns.discard(conn)

    def send(self, conn, data, msgs=0, framed=True):
        self.log.append(("sent", bytes(data)))

    def scan(self, chunks: list[bytes]) -> list[tuple]:
        """Feed chunks the way read_frames does (pending tail first, then the new bytes)."""
        self.log = []
        conn = Conn(_NoSocket(), 1, "fuzz", 0.0)  # type: ignore[arg-type]
        conn.mode = Mode.FRAME
        self.conns = {conn}
        for chunk in chunks:
            if not chunk:
                continue
            have = len(conn.pending)
            self.scratch[:have] = conn.pending
            self.scratch[have:have + len(chunk)] = chunk
            self.scan_frames(conn, have + len(chunk))
            if conn not in self.conns:
                break
        return self.log


def oracle(data: bytes, max_frame: int) -> list[tuple]:
    """What PROTOCOL.md says the server does with these bytes after HELLO (before EOF)."""
    dec = FrameDecoder(max_frame)
    if data:  # (b"" would mean end of stream)
        dec.feed(data)
    log: list[tuple] = []
    while True:
        try:
            ev = dec.next_event()
            if ev is NEED_DATA:
                return log
            assert isinstance(ev, Frame)
            check_client_frame(ev)
        except ProtocolError as err:
            log.append(("error", err.code))
            return log
        if ev.type == FrameType.MSG:
            log.append(("msg", ev.payload))
        elif ev.type == FrameType.PING:
            log.append(("sent", encode_frame(FrameType.PONG, ev.payload)))
        elif ev.type == FrameType.NEXT:
            log.append(("next",))
        elif ev.type == FrameType.BYE:
            log.append(("bye",))
            return log


def msg_heavy_inputs(rng: random.Random, n: int) -> list[bytes]:
    """Runs of MSG frames (short and > 127 bytes, some with bad UTF-8) mixed with control frames."""
    out = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(1, 10)):
            r = rng.random()
            if r < 0.6:
                text = fuzz.random_text(rng, rng.choice([1, 3, 40, 130])).encode()
                parts.append(encode_frame(FrameType.MSG, text))
            elif r < 0.7:
                body = rng.randbytes(rng.choice([1, 2, 130]))
                parts.append(encode_frame(FrameType.MSG, body))
            elif r < 0.8:
                parts.append(encode_frame(FrameType.MSG, "é".encode()[:1] + b"x" * rng.choice([0, 130])))
            else:
                parts.append(fuzz.valid_frame(rng) if rng.random() < 0.7 else random_frame(rng))
        data = b"".join(parts)
        if rng.random() < 0.3:
            data = fuzz.mutate(rng, data)
        out.append(data[:900])
    return out


@pytest.mark.timeout(60)
@pytest.mark.parametrize("max_frame", [HANDSHAKE_MAX, 65_536])
def test_scan_frames_matches_the_decoder(max_frame):
    rng = random.Random(SEED * 3 + max_frame)
    loop = RecordingLoop(max_frame)
    try:
        for data in msg_heavy_inputs(rng, 120) + frame_inputs(rng, 60):
            want = oracle(data, max_frame)
            for chunks in splits(data):
                try:
                    got = loop.scan(chunks)
                except Exception as err:  # noqa: BLE001
                    raise AssertionError(f"{type(err).__name__}: {err} on {data!r} split {len(chunks)}") from err
                if got != want:
                    i = next((k for k, (g, w) in enumerate(zip(got, want)) if g != w), min(len(got), len(want)))
                    raise AssertionError(
                        f"scan_frames (the server) and FrameDecoder + check_client_frame (the spec) disagree "
                        f"after {i} events, input split as {[len(c) for c in chunks][:8]}:\n"
                        f"  server: {got[i:i + 1] or 'nothing'}\n  spec:   {want[i:i + 1] or 'nothing'}\n"
                        f"  input:  {data!r}")
    finally:
        loop.conns.clear()
        loop.close_all()


# =====================================================================================
# (b) A live server
# =====================================================================================


def listener_of(server) -> int:
    """The listener's pid (it is started just after "listening on" is printed: poll /proc)."""
    deadline = time.monotonic() + 10
    while (pid := fuzz.listener_pid(server.proc.pid)) is None:
        assert time.monotonic() < deadline, "no listener process"
        time.sleep(0.02)
    return pid


@pytest.mark.timeout(30)
def test_live_server_survives_fuzzing(start_server):
    server = start_server("--handshake-timeout", "2", "-q")
    listener = listener_of(server)
    stats = fuzz.fuzz_round(server.port, random.Random(SEED), connections=50, max_seconds=3.0)
    assert stats["connections"] == 50
    assert stats["closed_by_server"] > 0 and stats["errors_received"] > 0, stats
    assert stats["paired"] > 0, f"no fuzzer was paired: the relay path was not fuzzed ({stats})"
    fuzz.honest_pair_check(server.port, "after", timeout=5)
    assert pid_alive(listener) and listener_of(server) == listener, "the listener process died"
    assert server.stop() == 0
    assert "Traceback" not in server.stderr_text, server.stderr_text[-4000:]


@pytest.mark.timeout(30)
def test_fuzz_script_runs():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "fuzz.py"), "--seconds", "1", "--seed", "3",
         "--connections", "10"],
        capture_output=True, text=True, timeout=25, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.splitlines()[-1].startswith("ok: "), proc.stdout


# =====================================================================================
# Found by the fuzzer above, pinned down on a live server
# =====================================================================================


@pytest.mark.timeout(30)
@pytest.mark.parametrize("ftype", [FrameType.PING, FrameType.PONG])
@pytest.mark.parametrize("paired", [False, True], ids=["waiting", "paired"])
def test_ping_or_pong_over_64_bytes_is_bad_frame(start_server, raw_client, ftype, paired):
    """PROTOCOL.md: PING carries 0-64 bytes and PONG "the PING's payload"; check_client_frame
    refuses either over 64 bytes, so the server must too (waiting in the listener or paired in a relay)."""
    server = start_server()
    a = raw_client(server.port)
    a.hello("big_ping")
    a.expect(FrameType.WELCOME)
    a.expect(FrameType.WAITING)
    if paired:
        b = raw_client(server.port)
        b.hello("partner")
        b.expect(FrameType.WELCOME)
        b.expect(FrameType.WAITING)
        b.expect(FrameType.PAIRED)
        a.expect(FrameType.PAIRED)
    a.send_frame(ftype, b"p" * 65)
    a.send_frame(FrameType.PING, b"after")  # answered only if the oversized frame was let through
    got, payload = a.read_frame()
    assert (got, json.loads(payload)["code"] if got == FrameType.ERROR else payload) == \
        (FrameType.ERROR, "bad_frame"), f"the server answered 0x{got:02x} {payload!r} instead of ERROR bad_frame"
    assert a.at_eof()
