# syntax=docker/dockerfile:1
# One image for every role (`spot-rebalancer agent|controller|webhook`): a static-ish release build on
# Debian 12, run as the distroless non-root user (65532) with nothing else in the image.
#
#   docker build -t spot-rebalancer:dev .
ARG RUST_VERSION=1.95

FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS build
# aws-lc-sys (rustls' crypto provider) builds its C code with cmake.
RUN apt-get update \
    && apt-get install -y --no-install-recommends cmake \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src src
# The manifest declares benchmarks; the image needs only the binary, so they are stubs here.
RUN mkdir -p benches && for bench in agent controller webhook; do echo 'fn main() {}' > "benches/$bench.rs"; done
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --profile image --locked --bin spot-rebalancer \
    && install -D -m 0755 target/image/spot-rebalancer /out/spot-rebalancer

FROM gcr.io/distroless/cc-debian12:nonroot
LABEL org.opencontainers.image.title="spot-rebalancer" \
      org.opencontainers.image.description="Scale first, validate, fall back to on-demand, then taint: AWS spot node replacement for Kubernetes" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /out/spot-rebalancer /usr/local/bin/spot-rebalancer
USER 65532:65532
EXPOSE 8080 9443
ENTRYPOINT ["/usr/local/bin/spot-rebalancer"]
