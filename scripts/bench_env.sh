#!/usr/bin/env bash
# Creates (or brings up to date) a bench-only virtual environment with uvloop
# and chatpair, for scripts/uvloop_relay.py, the yardstick that chatpair's
# performance figures are measured against. uvloop is not a dependency of
# chatpair: it lives only here. Safe to run again; prints the python to use.
#   bash scripts/bench_env.sh [VENV_DIR]     (default /tmp/chatpair-bench-venv)
#   PYTHON=python3.12 bash scripts/bench_env.sh   (another interpreter)
set -euo pipefail
venv="${1:-/tmp/chatpair-bench-venv}"
repo="$(cd "$(dirname "$0")/.." && pwd)"
if [ ! -x "$venv/bin/python" ]; then
    "${PYTHON:-python3}" -m venv "$venv" >&2
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check uvloop >&2
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -e "$repo" >&2
"$venv/bin/python" -c 'import uvloop, chatpair' >&2
echo "$venv/bin/python"
