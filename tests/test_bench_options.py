"""``chatpair bench`` options: server options only after ``--``, one ``-n``, TLS pinning,
idle's default hold, the short-run warning and Ctrl-C's partial report.

Real processes and sockets on 127.0.0.1; every wait has a deadline.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import wait_for

from chatpair.bench import BenchConfig, render, run_bench
from chatpair.bench.config import IDLE_HOLD

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(60)


def chatpair(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "chatpair", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "COLUMNS": "120"}, check=False)


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in proc.stderr
    return proc.stderr.strip().splitlines()[-1]


# -- options ------------------------------------------------------------------------------


def test_a_mistyped_option_gets_did_you_mean() -> None:
    proc = chatpair("bench", "--pair", "3")
    assert proc.returncode == 2
    assert "--pairs" in one_line_error(proc) and "Did you mean" in proc.stderr


def test_a_server_option_before_the_dashes_says_where_it_goes() -> None:
    proc = chatpair("bench", "--workers", "2")
    assert proc.returncode == 2
    assert "a server option goes after --" in one_line_error(proc)


def test_an_argument_without_the_dashes_is_refused() -> None:
    proc = chatpair("bench", "3")
    assert proc.returncode == 2
    assert "server options go after --" in one_line_error(proc)


def _short_options(command: str) -> dict[str, str]:
    """``-x`` -> ``--long`` as ``chatpair COMMAND --help`` lists them."""
    text = chatpair(command, "--help").stdout
    return dict(re.findall(r"^\s+(-[a-zA-Z]), (--[a-z-]+)", text, re.MULTILINE))


def test_n_means_the_same_in_every_command() -> None:
    meanings = {}
    for command in ("server", "client", "bench"):
        shorts = _short_options(command)
        if "-n" in shorts:
            meanings[command] = shorts["-n"]
    assert meanings.get("client") == "--name"
    assert set(meanings.values()) == {"--name"}, meanings
    assert "--messages" in chatpair("bench", "--help").stdout  # the long option stays


def test_plot_needs_svg_or_png_before_anything_runs() -> None:
    proc = chatpair("bench", "--plot", "out.pdf")
    assert proc.returncode == 2 and ".svg or .png" in one_line_error(proc)


def test_insecure_implies_tls() -> None:
    assert BenchConfig(insecure=True).resolved().tls
    assert "implies --tls" in " ".join(chatpair("bench", "--help").stdout.split("--insecure", 1)[1].split()[:20])


def test_a_target_that_is_not_chatpair_fails_at_once(tmp_path: Path) -> None:
    """An HTTP server: one line naming it, exit 2, in about a second - not "pairing stalled" after 30 s."""
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    http = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for("the HTTP server", lambda: _listening(port), timeout=10)
        start = time.monotonic()
        proc = chatpair("bench", "--target", f"127.0.0.1:{port}", "-d", "1")
        took = time.monotonic() - start
    finally:
        http.kill()
        http.wait()
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert lines[0].startswith(f"chatpair: 127.0.0.1:{port} is an HTTP server, not a chatpair server (it said: ")
    assert took < 8, took


def _listening(port: int) -> bool:
    import socket

    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def test_insecure_and_a_pin_contradict() -> None:
    proc = chatpair("bench", "--insecure", "--fingerprint", "SHA256:" + "ab" * 32, "--target", "127.0.0.1:9")
    assert proc.returncode == 2 and "contradict" in one_line_error(proc)


# -- idle holds, short runs warn --------------------------------------------------------------


def test_idle_holds_for_a_default_time_and_says_so() -> None:
    assert BenchConfig(mode="idle").resolved().duration == IDLE_HOLD > 0
    result = run_bench(BenchConfig(mode="idle", pairs=3, duration=0.3))
    assert result.ok, result.failures
    assert result.hold_elapsed == 0.3
    assert re.search(r"held\s+3 pairs for 0.3 s", render(result))


def test_a_short_run_warns_but_passes() -> None:
    proc = chatpair("bench", "--pairs", "1", "--messages", "20", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["ok"] and any("too short" in w for w in data["warnings"])
    assert any("latency samples" in w for w in data["warnings"])
    assert "chatpair bench: warning: the measured phase lasted" in proc.stderr


# -- Ctrl-C -------------------------------------------------------------------------------------


@pytest.mark.parametrize("json_mode", [False, True])
def test_ctrl_c_prints_the_partial_report_and_exits_130(start_server, json_mode: bool) -> None:
    server = start_server("--status-interval", "0.1")
    args = [sys.executable, "-m", "chatpair", "bench", "--target", f"127.0.0.1:{server.port}", "--pairs", "2",
            "--duration", "60", *(["--json"] if json_mode else [])]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # Messages relayed: the bench has counted both pairs as paired (it only
        # tells its load to start then), so the load is running. (The server's
        # own "paired" lines come sooner, before the bench may have read PAIRED.)
        wait_for("messages relayed", lambda: _relayed(server.stderr()) > 0, timeout=20)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    if json_mode:
        data = json.loads(out)
        assert data["interrupted"] is True and data["pairs_connected"] == 2
        assert data["lost"] == 0 and data["out_of_order"] == 0 and data["corrupt"] == 0
    else:
        assert "INTERRUPTED, partial" in out and "pairs paired     2" in out


def _relayed(log: str) -> int:
    """Messages relayed, from the server's latest status line (0 before the first)."""
    counts = re.findall(r"; (\d+) messages? relayed since start", log)
    return int(counts[-1]) if counts else 0


# -- TLS: --fingerprint / --insecure, like the client ------------------------------------------


def _make_cert(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "bench.pem", directory / "bench.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256", "-days", "2",
                    "-subj", "/CN=bench", "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key),
                    "-out", str(cert)], check=True, capture_output=True, timeout=30)
    return cert, key


def _fingerprint(cert: Path) -> str:
    import hashlib
    import ssl

    return "SHA256:" + hashlib.sha256(ssl.PEM_cert_to_DER_cert(cert.read_text())).hexdigest()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl to make a certificate")
def test_tls_pinned_insecure_and_refused(start_server, tmp_path: Path) -> None:
    cert, key = _make_cert(tmp_path)
    server = start_server("--tls-cert", str(cert), "--tls-key", str(key))
    target = ["--target", f"127.0.0.1:{server.port}", "--pairs", "1", "--messages", "20", "--json"]

    pinned = chatpair("bench", *target, "--fingerprint", _fingerprint(cert))
    assert pinned.returncode == 0, pinned.stderr
    assert json.loads(pinned.stdout)["delivered"] == 40

    insecure = chatpair("bench", *target, "--tls", "--insecure")
    assert insecure.returncode == 0, insecure.stderr

    implied = chatpair("bench", *target, "--insecure")  # --insecure implies --tls, as --fingerprint does
    assert implied.returncode == 0, implied.stderr
    assert json.loads(implied.stdout)["delivered"] == 40

    untrusted = chatpair("bench", *target, "--tls")
    assert untrusted.returncode == 2
    line = one_line_error(untrusted)
    assert "not trusted" in line and _fingerprint(cert) in line and "--fingerprint" in line

    wrong = chatpair("bench", *target, "--fingerprint", "SHA256:" + "00" * 32)
    assert wrong.returncode == 2
    assert "does not match the pinned fingerprint" in one_line_error(wrong)

    plain = chatpair("bench", *target)  # no --tls against a TLS server: the load fails, not hangs
    assert plain.returncode != 0 and "Traceback" not in plain.stderr
