# syntax=docker/dockerfile:1.7
# The mirrorfleet image: one binary that runs the controller (`mirrorfleet run`), the node agent
# (`mirrorfleet node-agent`, DaemonSet) and the cache cleanup (`mirrorfleet cleanup`, CronJob).
# `make image` builds it; the release workflow builds it for linux/amd64 and linux/arm64. The final
# stage is distroless (glibc, CA certificates, no shell, no package manager) and runs as the
# non-root user 65532; the node agent's pods run it as root (they write the host's runtime
# config), which their securityContext says, not the image.
# tests/chart.rs and tests/image_oci.rs check the paths below against what the builders, the chart
# and `make image-oci` use.
#
# The binary is stripped (21 MB instead of 151 MB with the release profile's line tables). Its
# symbols, for a backtrace or a core file, are the `symbols` stage:
#   docker buildx build --target symbols --platform linux/arm64 -o type=local,dest=out .
# writes out/mirrorfleet.debug (the release attaches one per architecture); the binary carries a
# .gnu_debuglink to it, so gdb finds it beside the binary or with `symbol-file`.

ARG RUST_VERSION=1.89

# The build stage runs on the builder's own platform and cross-compiles for the target one:
# emulating a whole Rust build under QEMU takes hours.
FROM --platform=$BUILDPLATFORM docker.io/library/rust:${RUST_VERSION}-bookworm AS build
ARG TARGETARCH
ARG BUILDARCH
WORKDIR /src
RUN set -eu; \
    case "$TARGETARCH" in \
      amd64) triple=x86_64-unknown-linux-gnu; gnu=x86_64-linux-gnu; deb=amd64 ;; \
      arm64) triple=aarch64-unknown-linux-gnu; gnu=aarch64-linux-gnu; deb=arm64 ;; \
      *) echo "unsupported TARGETARCH $TARGETARCH" >&2; exit 1 ;; \
    esac; \
    if [ "$TARGETARCH" != "$BUILDARCH" ]; then \
      apt-get update -qq; \
      apt-get install -y -qq --no-install-recommends "gcc-$gnu" "libc6-dev-$deb-cross" "binutils-$gnu"; \
      rm -rf /var/lib/apt/lists/*; \
    fi; \
    rustup target add "$triple"; \
    echo "$triple" > /triple; echo "$gnu" > /gnu
# Dependencies first, so a source change does not refetch them.
COPY Cargo.toml Cargo.lock ./
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    cargo fetch --locked
COPY src src
COPY benches benches
# `mirrorfleet render` embeds the sample fleet.
COPY config/samples config/samples
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target,id=target-$TARGETARCH \
    set -eu; triple=$(cat /triple); gnu=$(cat /gnu); \
    if [ "$TARGETARCH" != "$BUILDARCH" ]; then \
      export "CC_$(echo "$triple" | tr - _)=$gnu-gcc"; \
      export "CARGO_TARGET_$(echo "$triple" | tr a-z- A-Z_)_LINKER=$gnu-gcc"; \
      objcopy="$gnu-objcopy"; \
    else objcopy=objcopy; fi; \
    cargo build --release --locked --bin mirrorfleet --target "$triple"; \
    mkdir -p /out; \
    "$objcopy" --only-keep-debug "target/$triple/release/mirrorfleet" /out/mirrorfleet.debug; \
    "$objcopy" --strip-all --add-gnu-debuglink=/out/mirrorfleet.debug \
      "target/$triple/release/mirrorfleet" /out/mirrorfleet; \
    chmod 0755 /out/mirrorfleet

# The split-off debug info, not part of the image (see the top of this file).
FROM scratch AS symbols
COPY --from=build /out/mirrorfleet.debug /mirrorfleet.debug

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/mirrorfleet /usr/local/bin/mirrorfleet
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/mirrorfleet"]
CMD ["--help"]
