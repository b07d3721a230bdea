# One image for every role (`spot-rebalancer agent|controller|webhook`): a release build on Debian 12,
# run as the distroless non-root user (65532) with nothing else in the image.
#
#   DOCKER_BUILDKIT=1 docker build -t spot-rebalancer:dev .
#
# Both bases are pinned by digest (what a tag pointed to when it was pinned; refresh with
# `docker buildx imagetools inspect <image>:<tag>`). Machines that cannot pull from a registry pass
# local stand-ins built from Debian packages instead (`bed/docker-bases.sh` prints the arguments;
# `scripts/image` does it all):
#
#   docker build --build-arg BUILDER_IMAGE=... --build-arg RUNTIME_IMAGE=... --build-arg PROFILE=release .
#
# No `# syntax=` line: it would make BuildKit pull a frontend image; the frontend built into
# Docker >= 20.10 has everything used here (RUN --mount=type=cache).
ARG BUILDER_IMAGE=docker.io/library/rust:1.95-bookworm@sha256:6258907abe69656e41cd992e0b705cdcfabcbbe3db374f92ed2d47121282d4a1
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot@sha256:9dac0a79194e45a7da0158a9c6da57b217585af0786db3845d1f0ec1a0dd182f

FROM ${BUILDER_IMAGE} AS build
# `image` (fat LTO, one codegen unit, size-optimised: the smallest resident set, ~17 min on 2 cores) is
# what releases ship; `release` builds in about half the time and is what CI's image test uses.
ARG PROFILE=image
# aws-lc-sys (rustls' crypto provider) builds its C code with cmake (the stand-in has it already).
RUN command -v cmake >/dev/null || { apt-get update \
    && apt-get install -y --no-install-recommends cmake \
    && rm -rf /var/lib/apt/lists/*; }
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src src
# The manifest declares benchmarks and tests by name; the image needs only the binaries, so they are
# stubs here.
RUN for kind in bench:benches test:tests; do \
      mkdir -p "${kind#*:}"; \
      for name in $(sed -n "/^\\[\\[${kind%%:*}\\]\\]/,/^name/ s/^name = \"\\(.*\\)\"/\\1/p" Cargo.toml); do \
        echo 'fn main() {}' > "${kind#*:}/$name.rs"; \
      done; \
    done
# Every binary the package builds goes into the image (the role binary, and any other the manifest
# adds), as cargo reports them.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --profile "$PROFILE" --locked --bins --message-format=json-render-diagnostics >/tmp/build.json \
    && mkdir -p /out \
    && grep -o '"executable":"[^"]*"' /tmp/build.json | cut -d'"' -f4 | xargs -r install -m 0755 -t /out/ \
    && ls -l /out/ && test -x /out/spot-rebalancer

FROM ${RUNTIME_IMAGE}
LABEL org.opencontainers.image.title="spot-rebalancer" \
      org.opencontainers.image.description="Scale first, validate, fall back to on-demand, then taint: AWS spot node replacement for Kubernetes" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /out/ /usr/local/bin/
USER 65532:65532
EXPOSE 8080 9443
ENTRYPOINT ["/usr/local/bin/spot-rebalancer"]
