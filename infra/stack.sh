#!/usr/bin/env bash
# Local Proxy Stone stack without Docker: NATS (JetStream), Postgres, Redis and a
# ClickHouse-compatible endpoint (embedded chDB, infra/chdb/server.py).
#
#   infra/stack.sh up       start what is missing, reuse what already listens; safe to repeat
#   infra/stack.sh down     stop only what this script started (pid files in .stone/run)
#   infra/stack.sh status   one line per service: reused / started (pid) / down
#   infra/stack.sh env      print the STONE_* exports:  eval "$(infra/stack.sh env)"
#
# For each service: if something already listens on 127.0.0.1:<port> it is reused and never
# stopped by `down`. Otherwise the Debian package is installed if missing (apt-get, as root
# or through `sudo -n`) and a private server is started with its data under .stone/:
#   .stone/nats .stone/pg .stone/redis .stone/clickhouse .stone/venv .stone/logs .stone/run
#
# Environment overrides (defaults in brackets):
#   STONE_STACK_DIR [<repo>/.stone]   STONE_STACK_WAIT [60] seconds to wait for each port
#   STONE_STACK_NATS_PORT [4222]  STONE_STACK_PG_PORT [5432]  STONE_STACK_REDIS_PORT [6379]
#   STONE_STACK_CLICKHOUSE_PORT [8123]
#   STONE_STACK_SERVICES ["nats postgres redis clickhouse"]  subset to manage
# Works on a fresh Debian 12 and under CI=true with no stdin.

set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="${STONE_STACK_DIR:-$ROOT/.stone}"
LOGS="$STATE/logs"
RUN="$STATE/run"
HOST=127.0.0.1
WAIT="${STONE_STACK_WAIT:-60}"
NATS_PORT="${STONE_STACK_NATS_PORT:-4222}"
PG_PORT="${STONE_STACK_PG_PORT:-5432}"
REDIS_PORT="${STONE_STACK_REDIS_PORT:-6379}"
CH_PORT="${STONE_STACK_CLICKHOUSE_PORT:-8123}"
SERVICES="${STONE_STACK_SERVICES:-nats postgres redis clickhouse}"
REQUIREMENTS="$ROOT/infra/chdb/requirements.txt"
VENV="$STATE/venv"

export DEBIAN_FRONTEND=noninteractive
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1

log() { printf '%s\n' "$*"; }
warn() { printf 'warning: %s\n' "$*" >&2; }
die() {
  printf 'error: %s\n' "$*" >&2
  exit 1
}

# ---------------------------------------------------------------------------------------------
# helpers

port_of() {
  case "$1" in
    nats) echo "$NATS_PORT" ;;
    postgres) echo "$PG_PORT" ;;
    redis) echo "$REDIS_PORT" ;;
    clickhouse) echo "$CH_PORT" ;;
    *) die "unknown service $1" ;;
  esac
}

# Name the process of a service must have (checked against /proc/<pid>/cmdline so that a
# recycled pid never makes us report or stop somebody else's process).
proc_pattern() {
  case "$1" in
    nats) echo "nats-server" ;;
    postgres) echo "postgres" ;;
    redis) echo "redis-server" ;;
    clickhouse) echo "server.py" ;;
  esac
}

pidfile_of() {
  case "$1" in
    postgres) echo "$STATE/pg/postmaster.pid" ;;
    *) echo "$RUN/$1.pid" ;;
  esac
}

port_open() { # port
  # shellcheck disable=SC2016 # $0/$1 expand in the child shell
  timeout 2 bash -c 'exec 3<>"/dev/tcp/$0/$1"' "$HOST" "$1" 2>/dev/null
}

# The pid of the private server we started for a service, if it is alive; empty otherwise.
our_pid() { # service
  local pidfile pid
  pidfile="$(pidfile_of "$1")"
  [[ -r "$pidfile" ]] || return 0
  pid="$(head -n1 "$pidfile" 2>/dev/null | tr -dc '0-9')"
  [[ -n "$pid" && -r "/proc/$pid/cmdline" ]] || return 0
  if tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- "$(proc_pattern "$1")"; then
    echo "$pid"
  fi
}

as_root() {
  if [[ "$(id -u)" -eq 0 ]]; then
    "$@"
  elif command -v sudo >/dev/null 2>&1; then
    sudo -n true 2>/dev/null || die "'$*' needs root and 'sudo -n' is not allowed (run it yourself, or allow passwordless sudo)"
    sudo -n "$@"
  else
    die "'$*' needs root and sudo is not installed"
  fi
}

APT_UPDATED=0
apt_install() { # packages...
  command -v apt-get >/dev/null 2>&1 || die "apt-get not found: install $* yourself"
  if [[ "$APT_UPDATED" -eq 0 ]]; then
    log "apt-get update"
    as_root apt-get -o DPkg::Lock::Timeout=300 update -qq >"$LOGS/apt.log" 2>&1 ||
      die "apt-get update failed; see $LOGS/apt.log"
    APT_UPDATED=1
  fi
  log "apt-get install $*"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -q \
    --no-install-recommends "$@" >>"$LOGS/apt.log" 2>&1 </dev/null ||
    die "apt-get install $* failed; see $LOGS/apt.log"
}

find_bin() { # name -> absolute path or empty
  local p
  for p in "$(command -v "$1" 2>/dev/null || true)" "/usr/sbin/$1" "/usr/bin/$1" "/usr/local/bin/$1"; do
    if [[ -n "$p" && -x "$p" ]]; then
      echo "$p"
      return 0
    fi
  done
}

pg_bindir() {
  local d
  d="$(find /usr/lib/postgresql -mindepth 2 -maxdepth 2 -name bin -type d 2>/dev/null | sort -V | tail -n1)"
  [[ -n "$d" && -x "$d/initdb" && -x "$d/pg_ctl" ]] && echo "$d"
  return 0
}

# Run a command as the OS user that owns the private Postgres cluster.
as_pg() {
  if [[ "$(id -u)" -eq 0 ]]; then
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

# Launch a long-running server detached from this shell (own session, no stdin).
spawn() { # logfile cmd...
  local logfile="$1"
  shift
  printf '\n=== %s starting: %s\n' "$(date -u +%FT%TZ)" "$1" >>"$logfile"
  setsid "$@" </dev/null >>"$logfile" 2>&1 &
}

wait_ready() { # service log
  local svc="$1" logfile="$2" port deadline
  port="$(port_of "$svc")"
  deadline=$((SECONDS + WAIT))
  until port_open "$port"; do
    if ((SECONDS >= deadline)); then
      tail -n 20 "$logfile" >&2 2>/dev/null || true
      die "$svc did not start listening on $HOST:$port within ${WAIT}s; see $logfile"
    fi
    sleep 0.2
  done
}

# A freshly spawned server may still be starting: wait for its port, and fail early if the
# process died (its log says why).
wait_spawned() { # service log
  local svc="$1" logfile="$2" port deadline
  port="$(port_of "$svc")"
  deadline=$((SECONDS + WAIT))
  until port_open "$port" && [[ -n "$(our_pid "$svc")" ]]; do
    if ((SECONDS >= deadline)); then
      tail -n 20 "$logfile" >&2 2>/dev/null || true
      die "$svc did not start on $HOST:$port within ${WAIT}s; see $logfile"
    fi
    if [[ -n "${SPAWNED_PID:-}" ]] && ! kill -0 "$SPAWNED_PID" 2>/dev/null && [[ -z "$(our_pid "$svc")" ]]; then
      # Somebody else (e.g. a service the package manager just started) owns the port.
      port_open "$port" && return 0
      tail -n 20 "$logfile" >&2 2>/dev/null || true
      die "$svc exited while starting; see $logfile"
    fi
    sleep 0.2
  done
}

# ---------------------------------------------------------------------------------------------
# per-service checks on a reused server (warn, don't fail: it is not ours to fix)

check_reused() { # service
  local port line
  port="$(port_of "$1")"
  case "$1" in
    nats)
      # shellcheck disable=SC2016 # expanded by the child shell
      line="$(timeout 3 bash -c 'exec 3<>"/dev/tcp/$0/$1"; IFS= read -r -t 2 l <&3; printf "%s" "$l"' "$HOST" "$port" 2>/dev/null || true)"
      if [[ "$line" == INFO* && "$line" != *'"jetstream":true'* ]]; then
        warn "NATS on $HOST:$port does not announce JetStream (start it with -js)"
      fi
      ;;
    postgres)
      if command -v psql >/dev/null 2>&1 &&
        ! PGCONNECT_TIMEOUT=3 psql -X -q -w "postgres://postgres@$HOST:$port/postgres" -c 'select 1' >/dev/null 2>&1; then
        warn "cannot connect as postgres://postgres@$HOST:$port/postgres without a password; set STONE_DATABASE_URL"
      fi
      ;;
    clickhouse)
      # shellcheck disable=SC2016 # expanded by the child shell
      line="$(timeout 3 bash -c 'exec 3<>"/dev/tcp/$0/$1"; printf "GET /ping HTTP/1.0\r\nHost: %s\r\n\r\n" "$0" >&3; cat <&3' "$HOST" "$port" 2>/dev/null | tail -n1 || true)"
      [[ "$line" == Ok.* ]] || warn "the server on $HOST:$port does not answer /ping like ClickHouse"
      ;;
  esac
}

# ---------------------------------------------------------------------------------------------
# starters: each installs what is missing, then starts a private server in the background

start_nats() { # service
  local bin
  bin="$(find_bin nats-server)"
  if [[ -z "$bin" ]]; then
    apt_install nats-server
    bin="$(find_bin nats-server)"
    [[ -n "$bin" ]] || die "nats-server not found after installing it"
    port_open "$(port_of "$1")" && return 0 # the package started one: reuse it
  fi
  mkdir -p "$STATE/nats"
  spawn "$LOGS/nats.log" "$bin" -a "$HOST" -p "$NATS_PORT" -js -sd "$STATE/nats" -P "$RUN/nats.pid"
  SPAWNED_PID=$!
}

start_redis() { # service
  local bin
  bin="$(find_bin redis-server)"
  if [[ -z "$bin" ]]; then
    apt_install redis-server
    bin="$(find_bin redis-server)"
    [[ -n "$bin" ]] || die "redis-server not found after installing it"
    port_open "$(port_of "$1")" && return 0 # the package started one: reuse it
  fi
  mkdir -p "$STATE/redis"
  spawn "$LOGS/redis.log" "$bin" --bind "$HOST" --port "$REDIS_PORT" --save "" --appendonly no \
    --dir "$STATE/redis" --pidfile "$RUN/redis.pid" --daemonize no --logfile ""
  SPAWNED_PID=$!
}

start_postgres() {
  local bindir data="$STATE/pg" logfile="$LOGS/postgres.log"
  bindir="$(pg_bindir)"
  if [[ -z "$bindir" ]]; then
    # Install the server without letting the package create and start its own "main"
    # cluster on 5432: we run a private one under .stone/pg instead.
    if [[ ! -e /etc/postgresql-common/createcluster.conf ]]; then
      apt_install postgresql-common
    fi
    if ! grep -Eq '^[[:space:]]*create_main_cluster[[:space:]]*=[[:space:]]*(false|off)' /etc/postgresql-common/createcluster.conf 2>/dev/null &&
      [[ -z "$(ls -A /etc/postgresql 2>/dev/null || true)" ]]; then
      as_root sed -i -E 's/^#?[[:space:]]*create_main_cluster[[:space:]]*=.*/create_main_cluster = false/' \
        /etc/postgresql-common/createcluster.conf
    fi
    apt_install postgresql
    bindir="$(pg_bindir)"
    [[ -n "$bindir" ]] || die "initdb/pg_ctl not found under /usr/lib/postgresql after installing postgresql"
    if port_open "$PG_PORT"; then
      return 0 # the package started a server after all: reuse it
    fi
  fi
  if [[ "$(id -u)" -eq 0 ]]; then
    id postgres >/dev/null 2>&1 || die "OS user 'postgres' missing (it comes with postgresql-common)"
  fi
  if [[ ! -s "$data/PG_VERSION" ]]; then
    mkdir -p "$data"
    if [[ "$(id -u)" -eq 0 ]]; then
      chown postgres:postgres "$data"
      runuser -u postgres -- test -x "$data" ||
        die "OS user postgres cannot reach $data (make the folders above it world-executable)"
    fi
    chmod 700 "$data"
    log "initdb $data"
    as_pg "$bindir/initdb" -D "$data" -U postgres --auth-local=trust --auth-host=trust \
      -E UTF8 --locale=C.UTF-8 >>"$logfile" 2>&1 || die "initdb failed; see $logfile"
    {
      echo "# proxy-stone private dev cluster (infra/stack.sh)"
      echo "listen_addresses = '$HOST'"
      echo "unix_socket_directories = ''"
    } >>"$data/postgresql.conf"
  fi
  # pg_ctl forks the postmaster into the background and waits until it accepts connections.
  touch "$logfile"
  [[ "$(id -u)" -eq 0 ]] && chown postgres:postgres "$logfile"
  as_pg "$bindir/pg_ctl" -D "$data" -l "$logfile" -w -t "$WAIT" -o "-p $PG_PORT" start >/dev/null 2>&1 || {
    tail -n 20 "$logfile" >&2 || true
    die "postgres did not start on $HOST:$PG_PORT; see $logfile"
  }
  SPAWNED_PID=""
}

ensure_venv() {
  local py stamp_want stamp_have vlog="$LOGS/venv.log"
  py="$(command -v python3 || true)"
  if [[ -z "$py" ]] || ! "$py" -c 'import venv, ensurepip' >/dev/null 2>&1; then
    apt_install python3 python3-venv
    py="$(command -v python3 || true)"
    [[ -n "$py" ]] || die "python3 not found after installing it"
  fi
  stamp_want="$({
    cat "$REQUIREMENTS"
    "$py" -c 'import sys; print(sys.version)'
  } | sha256sum | cut -d' ' -f1)"
  stamp_have="$(cat "$VENV/.requirements.sha256" 2>/dev/null || true)"
  if [[ "$stamp_want" == "$stamp_have" && -x "$VENV/bin/python" ]] &&
    "$VENV/bin/python" -c 'import importlib.util as u, sys; sys.exit(not all(u.find_spec(m) for m in ("chdb", "lz4", "clickhouse_cityhash")))' >/dev/null 2>&1; then
    return 0
  fi
  log "preparing $VENV (pip install -r infra/chdb/requirements.txt; log: $vlog)"
  if [[ ! -x "$VENV/bin/python" ]] || ! "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1; then
    rm -rf "$VENV"
    "$py" -m venv "$VENV" >>"$vlog" 2>&1 || die "python3 -m venv failed; see $vlog"
  fi
  "$VENV/bin/python" -m pip install -q -r "$REQUIREMENTS" >>"$vlog" 2>&1 </dev/null ||
    die "pip install -r $REQUIREMENTS failed; see $vlog"
  echo "$stamp_want" >"$VENV/.requirements.sha256"
}

start_clickhouse() {
  ensure_venv
  mkdir -p "$STATE/clickhouse"
  spawn "$LOGS/clickhouse.log" "$VENV/bin/python" "$ROOT/infra/chdb/server.py" \
    --host "$HOST" --port "$CH_PORT" --data "$STATE/clickhouse" --pidfile "$RUN/clickhouse.pid"
  SPAWNED_PID=$!
}

# ---------------------------------------------------------------------------------------------
# commands

cmd_up() {
  local svc port pid
  for svc in $SERVICES; do
    port="$(port_of "$svc")"
    pid="$(our_pid "$svc")"
    if [[ -n "$pid" ]]; then
      wait_ready "$svc" "$LOGS/$svc.log"
      log "$svc: already running (pid $pid) on $HOST:$port"
      continue
    fi
    if port_open "$port"; then
      log "$svc: reusing the server already listening on $HOST:$port"
      check_reused "$svc"
      continue
    fi
    log "$svc: starting a private server on $HOST:$port (log: $LOGS/$svc.log)"
    SPAWNED_PID=""
    "start_$svc" "$svc"
    if [[ -z "$SPAWNED_PID" && -z "$(our_pid "$svc")" ]] && port_open "$port"; then
      # Installing the Debian package started a system server on the port.
      log "$svc: reusing the server its package started on $HOST:$port"
      check_reused "$svc"
      continue
    fi
    wait_spawned "$svc" "$LOGS/$svc.log"
    if [[ -z "$(our_pid "$svc")" ]]; then
      log "$svc: reusing the server that took $HOST:$port while ours was starting"
      continue
    fi
    log "$svc: started (pid $(our_pid "$svc")) on $HOST:$port"
  done
  log "ready. Environment: eval \"\$($0 env)\""
}

stop_pid() { # service pid
  local svc="$1" pid="$2" sig=TERM i
  # Postgres: SIGINT is the "fast" shutdown (SIGTERM would wait for clients to leave).
  [[ "$svc" == postgres ]] && sig=INT
  kill "-$sig" "$pid" 2>/dev/null || true
  for ((i = 0; i < 200; i++)); do
    [[ -d "/proc/$pid" ]] || return 0
    sleep 0.2
  done
  warn "$svc (pid $pid) did not stop within 40s; sending SIGKILL"
  kill -KILL "$pid" 2>/dev/null || true
}

cmd_down() {
  local svc pid port
  for svc in $SERVICES; do
    port="$(port_of "$svc")"
    pid="$(our_pid "$svc")"
    if [[ -n "$pid" ]]; then
      stop_pid "$svc" "$pid"
      [[ "$svc" == postgres ]] || rm -f "$(pidfile_of "$svc")"
      log "$svc: stopped (pid $pid)"
    elif port_open "$port"; then
      log "$svc: left running (not started by this script) on $HOST:$port"
    else
      rm -f "$RUN/$svc.pid"
      log "$svc: down"
    fi
  done
}

cmd_status() {
  local svc pid port
  for svc in $SERVICES; do
    port="$(port_of "$svc")"
    pid="$(our_pid "$svc")"
    if [[ -n "$pid" ]] && port_open "$port"; then
      printf '%-10s started (pid %s) %s:%s\n' "$svc" "$pid" "$HOST" "$port"
    elif [[ -n "$pid" ]]; then
      printf '%-10s starting (pid %s, %s:%s not answering yet)\n' "$svc" "$pid" "$HOST" "$port"
    elif port_open "$port"; then
      printf '%-10s reused %s:%s\n' "$svc" "$HOST" "$port"
    else
      printf '%-10s down\n' "$svc"
    fi
  done
}

cmd_env() {
  printf 'export STONE_NATS_URL=%s\n' "nats://$HOST:$NATS_PORT"
  printf 'export STONE_DATABASE_URL=%s\n' "postgres://postgres@$HOST:$PG_PORT/postgres"
  printf 'export STONE_REDIS_URL=%s\n' "redis://$HOST:$REDIS_PORT"
  printf 'export STONE_CLICKHOUSE_URL=%s\n' "http://$HOST:$CH_PORT"
}

usage() {
  echo "usage: $0 up|down|status|env" >&2
  exit 2
}

main() {
  [[ $# -eq 1 ]] || usage
  case "$1" in
    env)
      cmd_env
      return 0
      ;;
    up | down | status) ;;
    *) usage ;;
  esac
  mkdir -p "$LOGS" "$RUN"
  if [[ "$1" != status && -z "${STONE_STACK_LOCKED:-}" ]]; then
    # One up/down at a time. flock holds the lock itself (-o: the servers we start do not
    # inherit it) and runs this script again underneath.
    exec env STONE_STACK_LOCKED=1 flock -o -w 600 "$RUN/stack.lock" bash "${BASH_SOURCE[0]}" "$@"
  fi
  unset STONE_STACK_LOCKED
  "cmd_$1"
}

main "$@"
