#!/usr/bin/env bash
# Instructions per in-process cache hit, counted by callgrind: `bash infra/hit-instructions.sh
# [BINARY ...]` (default: target/release/stone). Throughput on a shared 2-core machine moves by
# 2x between minutes; an instruction count does not, so this is how two builds of the hit path
# are compared. For each binary: a hyper static upstream, `stone proxy` under callgrind with an
# in-process cache route (events off, Redis tier on), 400 warm-up hits, counters zeroed, then
# 4,000 hits over four keep-alive connections; prints the proxy's user-space instructions per
# hit (kernel time is not counted) and the same for the bare hyper baseline answering from
# memory (`stone bench hyper-baseline --mode static`). Needs valgrind and the local stack
# (`bash infra/stack.sh up`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
command -v valgrind >/dev/null 2>&1 || {
  as_root=""
  [ "$(id -u)" -eq 0 ] || as_root="sudo -n"
  $as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind >/dev/null
}
[ "$#" -gt 0 ] || set -- target/release/stone
eval "$(bash infra/stack.sh env)"

work=$(mktemp -d)
# The proxy creates its namespace's streams and KV bucket at start (the EVENTS stream reserves
# 8 GiB); they are deleted afterwards through the JetStream API, as the benches do.
cleanup() {
  kill $(jobs -p) 2>/dev/null || true
  python3 - "${STONE_NATS_URL:-nats://127.0.0.1:4222}" <<'PY' || true
import json, socket, sys
host, port = sys.argv[1].split("://")[-1].rsplit(":", 1)
def request(subject, payload=b""):
    with socket.create_connection((host, int(port))) as sock:
        reader = sock.makefile("rb")
        reader.readline()
        sock.sendall(b'CONNECT {"verbose":false}\r\nSUB _INBOX.hitcount 1\r\nPUB %s _INBOX.hitcount %d\r\n%s\r\n'
                     % (subject.encode(), len(payload), payload))
        while line := reader.readline():
            if line.startswith(b"MSG"):
                return json.loads(reader.read(int(line.split()[-1])))
    return {}
for name in request("$JS.API.STREAM.NAMES").get("streams") or []:
    if name.startswith(("HITCOUNT_", "KV_HITCOUNT_")):
        request("$JS.API.STREAM.DELETE." + name)
PY
  rm -rf "$work"
}
trap cleanup EXIT
upstream_port=19401 proxy_port=19402 admin_port=19403 baseline_port=19404

cat >"$work/load.py" <<'EOF'
import http.client, sys, threading
count, port = int(sys.argv[1]), int(sys.argv[2])
def run(requests):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    for _ in range(requests):
        connection.request("GET", "/1k")
        response = connection.getresponse()
        body = response.read()
        assert response.status == 200 and len(body) == 1024, (response.status, len(body))
threads = [threading.Thread(target=run, args=(count // 4,)) for _ in range(4)]
[thread.start() for thread in threads]
[thread.join() for thread in threads]
EOF

cat >"$work/proxy.toml" <<EOF
namespace = "hitcount"
nats_url = "${STONE_NATS_URL:-nats://127.0.0.1:4222}"
redis_url = "${STONE_REDIS_URL:-redis://127.0.0.1:6379}"

[telemetry]
log = "warn"

[proxy]
listen = "127.0.0.1:$proxy_port"
admin_listen = "127.0.0.1:$admin_port"
emit_events = false
spool_dir = "$work/spool"

[[proxy.upstreams]]
name = "bench"
targets = [{ url = "http://127.0.0.1:$upstream_port" }]

[[proxy.routes]]
name = "bench"
paths = ["/*"]
upstream = "bench"
cache = { enabled = true }
EOF

wait_for() { for _ in $(seq 600); do curl -sf -o /dev/null "$1" && return 0; sleep 0.5; done; return 1; }

# Runs "$@" under callgrind, calls $ready_url until it answers, loads $port and prints Ir/request.
count() {
  local label=$1 ready_url=$2 port=$3
  shift 3
  valgrind --tool=callgrind --callgrind-out-file="$work/$label.out" "$@" >/dev/null 2>"$work/$label.err" &
  local pid=$!
  wait_for "$ready_url"
  python3 "$work/load.py" 400 "$port"
  callgrind_control -z "$pid" >/dev/null
  python3 "$work/load.py" 4000 "$port"
  callgrind_control -d "$pid" >/dev/null
  kill "$pid"
  wait "$pid" 2>/dev/null || true
  local total
  total=$(callgrind_annotate "$(ls -t "$work/$label".out.* | head -1)" | grep -m1 "PROGRAM TOTALS" | awk '{gsub(",", "", $1); print $1}')
  echo "$label: $((total / 4000)) instructions per hit"
}

for binary in "$@"; do
  "$binary" bench hyper-baseline --mode static --listen "127.0.0.1:$upstream_port" >/dev/null 2>&1 &
  upstream=$!
  wait_for "http://127.0.0.1:$upstream_port/1k"
  count "$(basename "$binary") proxy" "http://127.0.0.1:$admin_port/readyz" "$proxy_port" \
    "$binary" --config "$work/proxy.toml" proxy
  kill "$upstream"
  wait "$upstream" 2>/dev/null || true
done
count "hyper baseline" "http://127.0.0.1:$baseline_port/1k" "$baseline_port" \
  "$1" bench hyper-baseline --mode static --listen "127.0.0.1:$baseline_port"
