# tenantpool container image: a stripped release binary (profile "dist"), run as a non-root
# user (uid 10001), the container config deploy/docker/tenantpool.toml, metrics and health
# endpoints on 0.0.0.0:9930. docs/deploy.md has the details.
#
# Build: docker build -t tenantpool .
# Run:   docker network create tp
#        docker run -d --network tp --name postgres -e POSTGRES_PASSWORD=... postgres:16
#        docker run --network tp -p 6432:6432 -p 9930:9930 \
#          -e TENANTPOOL_SERVER_PASSWORD=server-secret -e APP_PASSWORD=app-secret \
#          -e TENANTPOOL_ADMIN_PASSWORD=admin-secret tenantpool
#   Your own config (server.host, tenants, users): -v $PWD/myconfig:/etc/tenantpool
#   (a directory holding tenantpool.toml). Secrets from files (Docker or Kubernetes
#   secrets): -e APP_PASSWORD_FILE=/run/secrets/app_password instead of -e APP_PASSWORD=...;
#   every VAR_FILE sets VAR to the file's content (deploy/docker/entrypoint.sh).
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
COPY examples ./examples
RUN cargo build --profile dist --locked --bin tenantpool

FROM debian:bookworm-slim
# ca-certificates: server.tls = "verify-full" with the system's roots (Debian's current one).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 tenantpool \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin tenantpool \
    && install -d -o 10001 -g 10001 -m 0755 /var/run/tenantpool
COPY --from=build /src/target/dist/tenantpool /usr/local/bin/tenantpool
COPY deploy/docker/entrypoint.sh /usr/local/bin/tenantpool-entrypoint
COPY deploy/docker/tenantpool.toml /etc/tenantpool/tenantpool.toml
# Numeric, so that Kubernetes' runAsNonRoot can check it.
USER 10001:10001
EXPOSE 6432 9930
ENV TENANTPOOL_CONFIG=/etc/tenantpool/tenantpool.toml \
    RUST_LOG=info
# Liveness (the process answers), not readiness: a PostgreSQL outage must not get the
# container restarted. Load balancers and Kubernetes ask /readyz (deploy/kubernetes/).
# bash's /dev/tcp: the slim image has no curl.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/9930 && printf 'GET /healthz HTTP/1.0\\r\\n\\r\\n' >&3 && head -n 1 <&3 | grep -q ' 200 '"]
# SIGTERM drains (shutdown_timeout), SIGHUP reloads the config: the entrypoint execs the
# binary, which runs as PID 1 and gets them directly.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/tenantpool-entrypoint"]
