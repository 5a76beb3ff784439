#!/usr/bin/env bash
# Quick start, command 2: every check and test, against real NATS, Postgres, Redis and
# ClickHouse (the local stack is brought up first, installing what is missing).
#
#   1. formatting and lints (rustfmt, clippy -D warnings)
#   2. the whole test suite with cargo-nextest (cargo test when nextest is absent)
#
# JSON Schema currency is a test (events/tests/contract.rs: schemas_are_current).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash infra/stack.sh up
eval "$(bash infra/stack.sh env)"
export STONE_CLICKHOUSE_URL STONE_NATS_URL STONE_DATABASE_URL STONE_REDIS_URL

# The live-stream browser test drives Debian's headless Chromium.
if ! command -v chromium >/dev/null 2>&1; then
  echo "== installing chromium (browser test of the live stream)"
  as_root=""
  [ "$(id -u)" -eq 0 ] || as_root="sudo -n"
  $as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi

if command -v rustup >/dev/null 2>&1; then
  for component in rustfmt clippy; do
    rustup component list --installed 2>/dev/null | grep -q "^${component}" || rustup component add "$component"
  done
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "== tests"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast --profile "${NEXTEST_PROFILE:-default}"
else
  echo "(cargo-nextest not installed: using cargo test)"
  cargo test --workspace --locked --no-fail-fast
fi
