# syntax=docker/dockerfile:1
#
# The `stone` binary: one image for every Proxy Stone service.
#
#   docker build -t proxy-stone/stone .
#   docker run --rm proxy-stone/stone proxy       # or: analytics | gateway | dev | --help
#
# Configuration comes from STONE_* environment variables (see README); the listen addresses
# default to 0.0.0.0 here because 127.0.0.1 inside a container is unreachable from outside it.
# Needs BuildKit (the default builder of current Docker) for the cache mounts.

ARG RUST_VERSION=1
ARG DEBIAN_RELEASE=bookworm

# ---------------------------------------------------------------------------------------------
FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS builder
WORKDIR /src

# Only what the build reads: the workspace, its members, and the SQL migrations that
# services/kit embeds with include_str!. schemas/ comes along for anything that embeds them.
COPY Cargo.toml Cargo.lock ./
COPY events ./events
COPY services ./services
COPY migrations ./migrations
COPY schemas ./schemas

# The registry, git checkouts and target/ live in cache mounts, so a rebuild only recompiles
# what changed. target/ is not part of the image, so the binary is copied out in the same step.
# sharing=locked: compose builds the three services at once and they must not share a target/
# concurrently.
RUN --mount=type=cache,id=stone-cargo-registry,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,id=stone-cargo-git,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,id=stone-target,target=/src/target,sharing=locked \
    cargo build --release --locked -p stone \
    && install -D -m 0755 target/release/stone /out/stone

# ---------------------------------------------------------------------------------------------
FROM debian:${DEBIAN_RELEASE}-slim AS runtime

# ca-certificates for TLS to NATS/ClickHouse/Postgres/OTLP endpoints; curl for container
# healthchecks against /readyz.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/*

# A fixed non-root uid/gid so volume ownership is predictable. The home directory is the
# working directory: anything the services write relative to it (the proxy's event spool)
# lands there; mount a volume on it to keep that across restarts.
RUN groupadd --system --gid 10001 stone \
    && useradd --system --uid 10001 --gid stone --home-dir /var/lib/stone --create-home \
        --shell /usr/sbin/nologin stone

COPY --from=builder /out/stone /usr/local/bin/stone

ENV STONE_PROXY__LISTEN=0.0.0.0:8080 \
    STONE_PROXY__ADMIN_LISTEN=0.0.0.0:9180 \
    STONE_GATEWAY__LISTEN=0.0.0.0:8081 \
    STONE_ANALYTICS__ADMIN_LISTEN=0.0.0.0:9181

# proxy traffic, gateway, proxy admin, analytics admin
EXPOSE 8080 8081 9180 9181

USER 10001:10001
WORKDIR /var/lib/stone

LABEL org.opencontainers.image.title="Proxy Stone" \
      org.opencontainers.image.description="Event-sourced edge proxy: proxy, projectors and gateway in one binary" \
      org.opencontainers.image.licenses="Apache-2.0"

ENTRYPOINT ["stone"]
CMD ["--help"]
