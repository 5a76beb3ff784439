#!/usr/bin/env bash
# Benchmarks: `bash infra/bench.sh proxy|cache|pipeline|replay [options]` (`--help` for each).
# Brings up the local stack, installs the reference tools the proxy and cache benches compare
# against if they are missing (Debian's nginx and wrk), builds the release binary and runs
# `stone bench ...` with the stack's environment. Figures go to stdout; `--record
# docs/benchmarks.md` appends them. See docs/benchmarks.md for how to read them.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash infra/stack.sh up
eval "$(bash infra/stack.sh env)"
export STONE_CLICKHOUSE_URL STONE_NATS_URL STONE_DATABASE_URL STONE_REDIS_URL

missing=()
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx)
if [ "${#missing[@]}" -gt 0 ]; then
  echo "== installing ${missing[*]} (the benches' load tool and reference proxy)"
  as_root=""
  [ "$(id -u)" -eq 0 ] || as_root="sudo -n"
  $as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  # The package starts a system nginx on port 80; the benches run their own on free ports.
  $as_root service nginx stop >/dev/null 2>&1 || true
fi

cargo build --release -p stone
exec target/release/stone bench "$@"
