# syntax=docker/dockerfile:1.7
# The mirrorfleet image: one binary that runs the controller (`mirrorfleet run`), the node agent
# (`mirrorfleet node-agent`, DaemonSet) and the cache cleanup (`mirrorfleet cleanup`, CronJob).
# `make image` builds it. The final stage is distroless (glibc, CA certificates, no shell, no
# package manager) and runs as the non-root user 65532; the node agent's pods run it as root
# (they write the host's runtime config), which their securityContext says, not the image.
# tests/chart.rs checks the paths below against what the builders and the chart expect.

ARG RUST_VERSION=1.89

FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
# Dependencies first, so a source change does not refetch them.
COPY Cargo.toml Cargo.lock ./
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    cargo fetch --locked
COPY src src
COPY benches benches
# `mirrorfleet render` embeds the sample fleet.
COPY config/samples config/samples
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin mirrorfleet \
 && install -D -m 0755 target/release/mirrorfleet /out/mirrorfleet

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/mirrorfleet /usr/local/bin/mirrorfleet
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/mirrorfleet"]
CMD ["--help"]
