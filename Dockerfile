# syntax=docker/dockerfile:1
#
# Safety Inspector HTTP service.
#
#   docker build -t safety-inspector .
#   docker run --rm -p 127.0.0.1:8080:8080 -v inspector-data:/var/lib/inspector safety-inspector
#
# The image bundles the small demo model (models/demo); mount a real model directory and pass
# `--model DIR` to use it (see docker-compose.yml).

# ---------- build ----------
FROM rust:1-bookworm AS builder
WORKDIR /src
COPY . .
# The registry cache only speeds up rebuilds; the binary is copied out of target/ in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    cargo build --release --locked -p inspector-cli \
 && install -Dm755 target/release/inspector /out/inspector

# ---------- runtime ----------
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 inspector \
 && useradd --system --uid 10001 --gid inspector --home-dir /var/lib/inspector --no-create-home \
        --shell /usr/sbin/nologin inspector \
 && install -d -o inspector -g inspector -m 0750 /var/lib/inspector

COPY --from=builder /out/inspector /usr/local/bin/inspector
COPY models/demo /opt/inspector/models/demo
ENV INSPECTOR_DEMO_MODEL=/opt/inspector/models/demo

USER inspector
WORKDIR /var/lib/inspector
VOLUME /var/lib/inspector
EXPOSE 8080
# No HEALTHCHECK here: the slim image has no curl/wget and installing one just for that grows the
# image. docker-compose.yml defines the health check (bash /dev/tcp request to `GET /`).
# SIGTERM (Docker's default stop signal) makes the server finish running requests and exit.
STOPSIGNAL SIGTERM
ENTRYPOINT ["inspector"]
CMD ["serve", "--addr", "0.0.0.0:8080", "--db", "/var/lib/inspector/inspector.db", "--data-dir", "/var/lib/inspector/data"]
