# coachd container image: a release build on the official Rust image, run from Debian slim as a
# non-root user. Build: `docker build -t coachd .`; run with PostgreSQL and Redis: docker-compose.yml.
#
# The builder is pinned to the MSRV in Cargo.toml (rust-version = 1.89), the oldest toolchain the
# code is checked with. Builder and runtime are both Debian 12 (bookworm), so the binary's glibc
# matches. Pin the images by digest (`@sha256:…`) in production; tags are what could be named here.

FROM rust:1.89.0-slim-bookworm AS builder
WORKDIR /src
# Only what the build reads: the manifest, the lock, the sources, the SQL migrations (embedded by
# `sqlx::migrate!`) and the vendored assets (embedded with include_bytes!). Cargo also wants the
# benches and examples the manifest names, and .cargo/config.toml sets SQLX_OFFLINE.
COPY Cargo.toml Cargo.lock ./
COPY .cargo .cargo
COPY src src
COPY migrations migrations
COPY assets assets
COPY benches benches
COPY examples examples
# Cache mounts keep the registry and the target directory between builds (BuildKit); the binary
# is copied out because a cache mount is not part of the image.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin coachd \
    && cp target/release/coachd /usr/local/bin/coachd

FROM debian:bookworm-slim AS runtime
# Only CA certificates are added: no OpenSSL (TLS is rustls), no curl (see HEALTHCHECK). coachd's
# own clients carry the Mozilla roots compiled in; the system store serves anything else that
# verifies TLS in the container.
# Installed by name (the project's rule for apt): the suite's current, security-patched package.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 coachd \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/coachd --shell /usr/sbin/nologin coachd \
    && mkdir -p /var/lib/coachd/uploads \
    && chown -R coachd:coachd /var/lib/coachd
COPY --from=builder /usr/local/bin/coachd /usr/local/bin/coachd

# Numeric, so runtimes that check for a non-root uid (runAsNonRoot) can tell.
USER 10001:10001
WORKDIR /var/lib/coachd
ENV PORT=8000 \
    COACHD_HOST=0.0.0.0 \
    COACHD_LOG_FORMAT=json \
    COACHD_JOBS_UPLOAD_DIR=/var/lib/coachd/uploads
EXPOSE 8000
# The image has no curl: the binary probes its own /health/live (std TCP, 3 s limit).
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["/usr/local/bin/coachd", "healthcheck"]
# SIGTERM starts the ordered shutdown (drain delay, grace period, write-behind drain, trace flush);
# give `docker stop` more than COACHD_SHUTDOWN_DRAIN_DELAY_SECS + COACHD_SHUTDOWN_GRACE_SECS.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/coachd"]
CMD ["serve"]
