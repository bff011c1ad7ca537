"""Trust on first use and naming what answered, with real servers, real terminals (tmux) and openssl.

* in a terminal, the first TLS connection to an unknown server shows the
  fingerprint and asks (y/N); yes is remembered in
  ``$XDG_CONFIG_HOME/chatpair/known_servers`` and the second run does not ask;
  a server restarted with a new certificate is refused loudly, with both
  fingerprints and the line to remove; exit code 2;
* pipe mode never asks: one line saying how to trust the server;
* a plain client pointed at an HTTP server, an HTTPS server (openssl
  s_server) or chatpair's TLS port is told what it reached, quickly.
"""

from __future__ import annotations

import hashlib
import shlex
import shutil
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_tui_tmux import ROOT, Tmux

from chatpair.client.trust import KnownServers, known_servers_path

needs_tools = pytest.mark.skipif(shutil.which("openssl") is None or shutil.which("tmux") is None,
                                 reason="needs openssl and tmux")


def make_cert(directory: Path, name: str) -> tuple[Path, Path]:
    crt, key = directory / f"{name}.pem", directory / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(crt)],
                   check=True, capture_output=True, timeout=30)
    return crt, key


def fingerprint(crt: Path) -> str:
    return "SHA256:" + hashlib.sha256(ssl.PEM_cert_to_DER_cert(crt.read_text())).hexdigest()


def run_pipe(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    import os
    return subprocess.run([sys.executable, "-m", "chatpair", "client", *args], input=b"", capture_output=True,
                          timeout=20, cwd=ROOT, env={**os.environ, **(env or {})})


@pytest.fixture
def tmux(tmp_path):
    t = Tmux(tmp_path)
    yield t
    t.kill()


def test_known_servers_path_and_file(tmp_path):
    assert known_servers_path({"XDG_CONFIG_HOME": str(tmp_path)}) == str(tmp_path / "chatpair" / "known_servers")
    assert known_servers_path({"XDG_CONFIG_HOME": "relative", "HOME": "/h"}).endswith("/.config/chatpair/known_servers")
    store = KnownServers(str(tmp_path / "d" / "known_servers"))
    assert store.lookup("Example.org", 7878) == []
    assert store.add("Example.org", 7878, b"\x01" * 32) == 1
    (tmp_path / "d" / "known_servers").open("a").write("# a comment\n\ngarbage line here\n")
    assert store.add("::1", 9000, b"\x02" * 32) == 5
    text = (tmp_path / "d" / "known_servers").read_text()
    assert text.splitlines()[0] == "example.org:7878 SHA256:" + "01" * 32
    assert text.splitlines()[4] == "[::1]:9000 SHA256:" + "02" * 32
    assert [(k.line, k.digest) for k in store.lookup("EXAMPLE.org", 7878)] == [(1, b"\x01" * 32)]
    assert store.lookup("example.org", 7879) == []


@needs_tools
def test_tofu_prompt_memory_and_changed_key_in_tmux(start_server, tmux, tmp_path):
    first_crt, first_key = make_cert(tmp_path, "first")
    server = start_server("--tls-cert", str(first_crt), "--tls-key", str(first_key))
    port = server.port
    xdg = tmp_path / "xdg"
    known = xdg / "chatpair" / "known_servers"
    client = (f"XDG_CONFIG_HOME={shlex.quote(str(xdg))} {shlex.quote(sys.executable)} -m chatpair client "
              f"--tls --port {port} --name tofu")

    # Pipe mode never asks: one line that says how to trust the server.
    result = run_pipe("--tls", "--port", str(port), "--name", "p", env={"XDG_CONFIG_HOME": str(xdg)})
    err = result.stderr.decode()
    assert result.returncode == 2 and err.count("\n") == 1, err
    assert fingerprint(first_crt) in err and "run chatpair client once in a terminal" in err
    assert "--fingerprint" in err and not known.exists()

    # First use in a terminal: the fingerprint, one question; "n" connects to nothing.
    tmux.start("no", client, width=200)
    lines = tmux.wait_text("no", "[y/N]")
    assert any(fingerprint(first_crt) in line for line in lines)
    tmux.keys("no", "n")  # one key answers, no Enter needed; the answer is echoed
    lines = tmux.wait_text("no", "EXIT=2")
    assert any(line.rstrip().endswith("[y/N] n") for line in lines), lines
    assert any("not trusted (you said no)" in line for line in lines) and not known.exists()

    # Yes: remembered, and the chat starts.
    tmux.start("yes", client)
    tmux.wait_text("yes", "[y/N]")
    tmux.keys("yes", "y")  # acts at once: the chat starts without Enter
    tmux.wait_text("yes", "waiting for a partner")
    assert known.read_text() == f"127.0.0.1:{port} {fingerprint(first_crt)}\n"
    tmux.keys("yes", "/quit", "Enter")
    tmux.wait_text("yes", "EXIT=0")

    # Second run: no question.
    tmux.start("again", client)
    lines = tmux.wait_text("again", "waiting for a partner")
    assert not any("[y/N]" in line for line in lines)
    tmux.keys("again", "/quit", "Enter")
    tmux.wait_text("again", "EXIT=0")

    # The server restarted with a new certificate: refused loudly, both values, the line to remove.
    server.stop()
    second_crt, second_key = make_cert(tmp_path, "second")
    start_server("--tls-cert", str(second_crt), "--tls-key", str(second_key), "--port", str(port))
    tmux.start("changed", client, width=200)
    lines = tmux.wait_text("changed", "EXIT=2")
    text = "".join(line.rstrip() for line in lines)  # the one long line, wrapped by the pane
    assert "HAS CHANGED" in text and fingerprint(first_crt) in text and fingerprint(second_crt) in text
    assert f"remove line 1 of {known}" in text
    assert "[y/N]" not in text and "Traceback" not in text


@needs_tools
def test_the_question_takes_one_key_and_ctrl_c_is_not_a_no(start_server, tmux, tmp_path):
    """Enter (or any key but y) is no at once; Ctrl-C is an interruption (exit 130), terminal restored."""
    crt, key = make_cert(tmp_path, "k")
    server = start_server("--tls-cert", str(crt), "--tls-key", str(key))
    xdg = tmp_path / "xdg"
    client = (f"XDG_CONFIG_HOME={shlex.quote(str(xdg))} {shlex.quote(sys.executable)} -m chatpair client "
              f"--tls --port {server.port} --name onekey")
    for session, keys in (("enter", "Enter"), ("other", "x")):
        tmux.start(session, client, width=200)
        tmux.wait_text(session, "[y/N]")
        tmux.keys(session, keys)
        lines = tmux.wait_text(session, "EXIT=2")
        assert any(line.rstrip().endswith("[y/N] n") for line in lines), lines
        assert any("not trusted (you said no)" in line for line in lines)

    before, after = tmp_path / "before", tmp_path / "after"
    tmux.start("ctrlc", f"stty -g > {before}; {client}; code=$?; stty -g > {after}; (exit $code)", width=200)
    tmux.wait_text("ctrlc", "[y/N]")
    tmux.keys("ctrlc", "C-c")
    lines = tmux.wait_text("ctrlc", "EXIT=130")
    text = "\n".join(lines)
    assert f"chatpair: interrupted; 127.0.0.1:{server.port} not trusted, not connecting" in text
    assert "you said no" not in text and "Traceback" not in text
    assert before.read_text() == after.read_text()  # cbreak mode was undone
    assert not (xdg / "chatpair" / "known_servers").exists()


def _http_server(tmp_path: Path) -> tuple[subprocess.Popen, int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, port


def _wait_listening(port: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise AssertionError("the server did not start listening")
            time.sleep(0.05)  # poll until it listens


def test_http_server_is_named_not_sent_to_tls(tmp_path):
    proc, port = _http_server(tmp_path)
    try:
        _wait_listening(port, proc)
        started = time.monotonic()
        result = run_pipe("--port", str(port), "--name", "a")
        took = time.monotonic() - started
    finally:
        proc.kill()
        proc.wait()
    err = result.stderr.decode()
    assert result.returncode == 2 and err.count("\n") == 1, err
    assert f"127.0.0.1:{port} is an HTTP server, not a chatpair server (it said: " in err
    assert "--tls" not in err and took < 8  # recognised well before the 10 s timeout


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")
def test_https_server_says_try_tls(tmp_path):
    crt, key = make_cert(tmp_path, "s")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(["openssl", "s_server", "-accept", str(port), "-cert", str(crt), "-key", str(key),
                             "-quiet"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_listening(port, proc)
        result = run_pipe("--port", str(port), "--name", "a")
    finally:
        proc.kill()
        proc.wait()
    err = result.stderr.decode()
    assert result.returncode == 2 and err.count("\n") == 1, err
    assert f"127.0.0.1:{port} speaks TLS: try --tls" in err


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")
def test_chatpair_tls_port_without_tls(start_server, tmp_path):
    crt, key = make_cert(tmp_path, "c")
    server = start_server("--tls-cert", str(crt), "--tls-key", str(key))
    result = run_pipe("--port", str(server.port), "--name", "a")
    err = result.stderr.decode()
    assert result.returncode == 2 and err.count("\n") == 1, err
    assert "--tls" in err and "Traceback" not in err


def test_connecting_feedback_in_a_terminal(server, tmux):
    tmux.client("c", server.port, "c")
    tmux.wait_text("c", "waiting for a partner")
    tmux.keys("c", "/quit", "Enter")
    lines = tmux.wait_text("c", "EXIT=0")
    assert f"connecting to 127.0.0.1:{server.port}..." in "\n".join(lines)
    # Pipe mode keeps stdout clean and, on a fast connection, stderr too.
    result = run_pipe("--port", str(server.port), "--name", "d")
    assert result.returncode == 0 and b"connecting" not in result.stdout + result.stderr
