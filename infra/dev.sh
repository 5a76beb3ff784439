#!/usr/bin/env bash
# Quick start, command 1: bring up the local stack (installing what is missing) and run every
# Proxy Stone service in one process with a demo upstream and demo traffic. Ctrl-C stops the
# services; `bash infra/stack.sh down` stops the servers this script started.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash infra/stack.sh up
eval "$(bash infra/stack.sh env)"
export STONE_CLICKHOUSE_URL STONE_NATS_URL STONE_DATABASE_URL STONE_REDIS_URL
exec cargo run --release --locked -p stone -- dev "$@"
