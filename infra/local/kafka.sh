#!/usr/bin/env bash
# The embedded Kafka-protocol broker (noida-db) for tests and local runs, without Docker.
#
#   infra/local/kafka.sh start DIR [PORT]   start in the background; prints KAFKA_BOOTSTRAP_SERVERS=...
#   infra/local/kafka.sh stop DIR           clean stop (the broker saves its data on SIGTERM)
#
# Data in DIR/data, log in DIR/broker.log, connection info in DIR/broker.env.
# Uses the project's venv python (override with PYTHON=...).
set -euo pipefail

die() { echo "kafka.sh: error: $*" >&2; exit 1; }
say() { echo "kafka.sh: $*" >&2; }
usage() { echo "usage: $0 start DIR [PORT] | stop DIR" >&2; exit 2; }

[ $# -ge 2 ] || usage
cmd=$1
dir_arg=$2
port_arg=${3:-}

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd -P)
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
[ -x "$PYTHON" ] || die "no python at $PYTHON; run 'make venv' or set PYTHON"
# Works from a checkout even before `pip install -e .`.
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
MODULE=khala_stream.broker.local_broker

# Prints the recorded broker pid if that process is alive. A stopped broker can linger as a
# zombie until init reaps it, and kill -0 succeeds on zombies, so look at its state too.
broker_pid() {
  local dir=$1 pid state
  [ -f "$dir/broker.env" ] || return 0
  pid=$(sed -n 's/^KAFKA_PID=//p' "$dir/broker.env")
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 0
  state=$(sed 's/.*) //' "/proc/$pid/stat" 2>/dev/null | cut -d' ' -f1 || true)
  [ "$state" = Z ] || echo "$pid"
}

start() {
  mkdir -p "$dir_arg"
  local dir out
  dir=$(cd "$dir_arg" && pwd -P)
  if [ -n "$(broker_pid "$dir")" ]; then
    say "already running ($dir)"
    grep '^KAFKA_BOOTSTRAP_SERVERS=' "$dir/broker.env"
    return 0
  fi
  local args=(start --data-dir "$dir/data")
  [ -z "$port_arg" ] || args+=(--port "$port_arg")
  out=$("$PYTHON" -m "$MODULE" "${args[@]}") || die "broker did not start; see $dir/broker.log"
  printf '%s\n' "$out" >"$dir/broker.env"
  printf '%s\n' "$out"
}

stop() {
  if [ ! -d "$dir_arg" ]; then
    say "no such directory: $dir_arg (nothing to stop)"
    return 0
  fi
  local dir pid
  dir=$(cd "$dir_arg" && pwd -P)
  pid=$(broker_pid "$dir")
  if [ -z "$pid" ]; then
    say "not running ($dir)"
    return 0
  fi
  "$PYTHON" -m "$MODULE" stop --pid "$pid"
}

case "$cmd" in
  start) start ;;
  stop) stop ;;
  *) usage ;;
esac
