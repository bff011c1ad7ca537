#!/bin/bash
# Does chatpair server leave nothing behind? 20 runs each without and with
# --workers 2: start it in a new process group, wait for the listener (and
# workers) and a client, kill -TERM the main process (second argument
# "group": the whole group, as systemd does), and run pgrep -g the moment the
# server has exited. Usage: scripts/check_clean_exit.sh [REPO] [group]
# PYTHON picks the interpreter (default: REPO/.venv/bin/python).
cd "${1:-$(dirname "$0")/..}"
python=${PYTHON:-$PWD/.venv/bin/python}
for w in 0 2; do
  ok=0; want=$((3 + w))   # main + resource tracker + listener (+ workers)
  for i in $(seq 20); do
    out=$(mktemp)
    setsid "$python" -m chatpair server --host 127.0.0.1 --port 0 --workers $w </dev/null >"$out" 2>"$out.err" &
    pid=$!
    for t in $(seq 500); do [ "$(pgrep -g $pid | wc -l)" -ge $want ] && grep -q '^listening on' "$out" && break; sleep 0.01; done
    port=$(sed -n 's/^listening on .*:\([0-9]*\)$/\1/p' "$out")
    exec 3<>/dev/tcp/127.0.0.1/$port; head -c 10 <&3 >/dev/null   # a client: the listener serves
    if [ "$2" = group ]; then kill -TERM -- -$pid; else kill -TERM $pid; fi
    wait $pid; rc=$?
    left=$(pgrep -g $pid)
    exec 3<&-
    if [ $rc = 0 ] && [ -z "$left" ]; then ok=$((ok+1)); else echo "run $i: exit $rc, left: $left"; tail -3 "$out.err"; fi
    rm -f "$out" "$out.err"
  done
  echo "--workers $w: $ok/20 with the process group empty at exit"
done
