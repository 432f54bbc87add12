# Build: docker build -t tenantpool .
# Run:   docker run -p 6432:6432 -v $PWD/config:/etc/tenantpool -e TENANTPOOL_SERVER_PASSWORD=... tenantpool
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
COPY examples ./examples
RUN cargo build --release --locked --bin tenantpool

FROM debian:bookworm-slim
RUN useradd --system --no-create-home tenantpool
COPY --from=build /src/target/release/tenantpool /usr/local/bin/tenantpool
COPY config/tenantpool.toml /etc/tenantpool/tenantpool.toml
USER tenantpool
EXPOSE 6432 9930
ENV TENANTPOOL_CONFIG=/etc/tenantpool/tenantpool.toml
ENTRYPOINT ["/usr/local/bin/tenantpool"]
