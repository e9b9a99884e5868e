# callapi: one image with the four services (gateway, commands, proxy-connector, event-ingest);
# a Kubernetes Deployment picks one with its command (deploy/k8s). `make image` builds it.
# Build stage: the workspace's release binaries (protoc is vendored: nothing else to install).
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked \
      -p gateway -p commands -p proxy-connector -p event-ingest \
 && mkdir /out \
 && cp target/release/gateway target/release/commands \
       target/release/proxy-connector target/release/event-ingest /out/

# Runtime stage: Debian slim with CA certificates (webhooks over HTTPS, NATS over TLS), no shell
# tools beyond the base, a non-root user.
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 callapi \
 && useradd --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin callapi
COPY --from=build /out/ /usr/local/bin/
USER 10001:10001
# 5059: gateway (WebSocket, REST, probes, metrics); 9090: the others' ops_listen; 9000/udp:
# event-ingest's OpenSIPS events.
EXPOSE 5059 9090 9000/udp
CMD ["/usr/local/bin/gateway", "--config", "/etc/callapi/config/gateway.toml"]
