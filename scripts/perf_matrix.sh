#!/usr/bin/env bash
# Runs the chatpair bench command lines quoted in docs/performance.md, one
# after the other, and prints each command with its report. Run it on a quiet
# machine: every figure depends on nothing else competing for the cores.
#   bash scripts/perf_matrix.sh 2>&1 | tee perf.txt
set -u
run() {
    echo "\$ $*"
    "$@" 2>&1 | sed -n '1,14p'
    echo
}
run chatpair bench
run chatpair bench -m flood -P 100 -d 5 --procs 2
run chatpair bench -m flood -P 100 -d 5 --procs 2 -- --workers 2
run chatpair bench -m pingpong -P 1 -d 5
run chatpair bench -m pingpong -P 100 -d 5 --procs 1
run chatpair bench -m pingpong -P 100 -d 5 --procs 1 -- --relay-threads 2
run chatpair bench -m pingpong -P 100 -d 5 --procs 1 -- --workers 2
run chatpair bench -m idle -P 9900
run chatpair bench -m idle -P 9900 -- --workers 2
run chatpair bench -m churn -P 20 -d 5 --procs 2

# The thread-per-direction model, for comparison (scripts/thread_relay.py).
python3 "$(dirname "$0")/thread_relay.py" --port 7979 > /dev/null &
relay=$!
sleep 1
run chatpair bench --target 127.0.0.1:7979 --server-pid $relay -m pingpong -P 1 -d 5
run chatpair bench --target 127.0.0.1:7979 --server-pid $relay -m pingpong -P 100 -d 5 --procs 1
run chatpair bench --target 127.0.0.1:7979 --server-pid $relay -m flood -P 100 -d 5 --procs 2
kill $relay
python3 "$(dirname "$0")/thread_relay.py" --port 7979 > /dev/null &
relay=$!
sleep 1
run chatpair bench --target 127.0.0.1:7979 --server-pid $relay -m idle -P 5000
kill $relay
