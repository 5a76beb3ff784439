# Proxy Stone tasks.
#
# `just` is optional (`cargo install just`): every recipe is one plain command that can be
# copied into a shell as it is, run from the repository root.

set shell := ["bash", "-euo", "pipefail", "-c"]

# List the recipes
default:
    @just --list --unsorted

# Start NATS (JetStream), Postgres, Redis and the ClickHouse endpoint without Docker; reuses what already listens
up:
    bash infra/stack.sh up

# Stop only what `just up` started
down:
    bash infra/stack.sh down

# One line per infrastructure service: reused, started or down
status:
    bash infra/stack.sh status

# Quick start: the stack, then every service in one process (`stone dev`)
dev:
    bash infra/dev.sh

# Run the test suite (as CI does)
test:
    bash infra/test.sh

# Regenerate the JSON Schemas of every event type and version into schemas/
schemas:
    cargo run -q -p stone-events --example write_schemas

# Formatting and lints, as CI checks them
check:
    cargo fmt --all -- --check && cargo clippy --workspace --all-targets -- -D warnings

# Format the workspace
fmt:
    cargo fmt --all

# Benchmarks against nginx and raw JetStream reads (installs nginx and wrk if missing): `just bench proxy --help`
bench *ARGS:
    bash infra/bench.sh {{ ARGS }}
