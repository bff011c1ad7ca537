"""``contrib/``: the systemd unit and its environment file.

``systemd-analyze verify`` needs the unit's ExecStart binary to exist, and
``/opt/chatpair/bin/chatpair`` (where docs/deploy.md installs it) does not
here: the test verifies a copy whose ExecStart names this checkout's
``chatpair`` instead - nothing else is changed - and checks that the one
complaint about the original is that missing binary. Unknown keys are only
warnings for ``verify`` (exit code 0), so any output at all fails the test.
The environment file is checked against the server itself: every variable
it names is one ``chatpair server`` reads, and the server starts with it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ServerProcess

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "contrib" / "chatpair.service"
ENV = ROOT / "contrib" / "chatpair.env"
INSTALLED = "/opt/chatpair/bin/chatpair"
pytestmark = pytest.mark.timeout(60)

needs_systemd_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                           reason="systemd-analyze is not installed")


def _chatpair_binary() -> str:
    here = Path(sys.executable).with_name("chatpair")
    found = str(here) if here.exists() else shutil.which("chatpair")
    if not found:
        pytest.skip("no installed chatpair script to point ExecStart at")
    return found


def _unit_copy(tmp_path: Path) -> Path:
    text = UNIT.read_text(encoding="utf-8")
    assert f"ExecStart={INSTALLED} server\n" in text
    copy = tmp_path / "chatpair.service"
    copy.write_text(text.replace(f"ExecStart={INSTALLED} ", f"ExecStart={_chatpair_binary()} "), encoding="utf-8")
    return copy


def _settings(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        m = re.match(r"^([A-Za-z]+)=(.*)$", line)
        if m:
            out.setdefault(m.group(1), []).append(m.group(2))
    return out


@needs_systemd_analyze
def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    copy = _unit_copy(tmp_path)
    proc = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, timeout=30,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "" and proc.stderr.strip() == "", proc.stdout + proc.stderr

    # The original differs only in the path, which does not exist here: that is verify's one complaint.
    original = subprocess.run(["systemd-analyze", "verify", str(UNIT)], capture_output=True, text=True,
                              timeout=30, check=False)
    complaints = [line for line in (original.stdout + original.stderr).splitlines() if line.strip()]
    if not Path(INSTALLED).exists():
        assert len(complaints) == 1 and INSTALLED in complaints[0], complaints


@needs_systemd_analyze
def test_the_unit_is_hardened(tmp_path: Path) -> None:
    s = _settings(UNIT.read_text(encoding="utf-8"))
    for key, value in {
        "DynamicUser": "yes", "NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
        "PrivateTmp": "yes", "CapabilityBoundingSet": "CAP_NET_BIND_SERVICE",
        "AmbientCapabilities": "CAP_NET_BIND_SERVICE", "EnvironmentFile": "-/etc/default/chatpair",
        "KillSignal": "SIGTERM", "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
    }.items():
        assert s.get(key) == [value], (key, s.get(key))
    proc = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(_unit_copy(tmp_path))],
                          capture_output=True, text=True, timeout=30, check=False)
    m = re.search(r"Overall exposure level for \S+: ([\d.]+)", proc.stdout + proc.stderr)
    if m is None:
        pytest.skip("this systemd-analyze has no offline security report")
    assert float(m.group(1)) <= 2.5, proc.stdout[-2000:]


def _env_file() -> tuple[dict[str, str], set[str]]:
    """(the variables set, every variable named - also in comments)."""
    text = ENV.read_text(encoding="utf-8")
    values = dict(re.findall(r"^(CHATPAIR_[A-Z_]+)=(.*)$", text, re.MULTILINE))
    named = set(re.findall(r"^#?(CHATPAIR_[A-Z_]+)=", text, re.MULTILINE))
    return values, named


def test_the_environment_file_names_only_server_variables() -> None:
    help_text = subprocess.run([sys.executable, "-m", "chatpair", "server", "--help"], cwd=ROOT,
                               capture_output=True, text=True, timeout=30, check=False,
                               env={**os.environ, "COLUMNS": "400"}).stdout
    known = set(re.findall(r"env var: (CHATPAIR_[A-Z_]+)", " ".join(help_text.split())))
    _, named = _env_file()
    assert named and not named - known, f"not server variables: {sorted(named - known)}"


def test_the_server_starts_with_the_environment_file() -> None:
    values, _ = _env_file()
    env = {k: v for k, v in values.items() if k not in ("CHATPAIR_HOST", "CHATPAIR_PORT")}
    server = ServerProcess(env=env)  # --host 127.0.0.1 --port 0 on the command line
    try:
        assert server.port > 0
    finally:
        assert server.stop() == 0
