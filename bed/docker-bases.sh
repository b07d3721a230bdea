#!/usr/bin/env bash
# Builds the two base images the Dockerfile names, as local stand-ins, for machines that cannot pull
# from a registry (CI and these machines): both from Debian bookworm packages (mmdebstrap), imported
# with `docker import`. They are cached as Docker images and as tarballs outside the repository, keyed
# by a hash of their inputs (this script, the Debian suite and the Rust toolchain's version), so a warm
# machine builds nothing. Prints the build arguments that select them:
#
#   --build-arg BUILDER_IMAGE=spot-rebalancer-bed/rust-builder:<key>
#   --build-arg RUNTIME_IMAGE=spot-rebalancer-bed/runtime:<key>
#
# What they stand in for (the Dockerfile's pinned defaults):
# - rust-builder for docker.io/library/rust:<version>-bookworm: Debian bookworm with gcc, libc6-dev,
#   make, cmake, git and ca-certificates (its bundle replaced by the host's, so crates.io is reached as
#   the host reaches it), plus the host's Rust toolchain (rustup's, the version in
#   RUST_VERSION, default 1.95) copied to /usr/local/rust: Debian's own rustc is too old for edition
#   2024. CARGO_HOME is /usr/local/cargo, as in the official image.
# - runtime for gcr.io/distroless/cc-debian12:nonroot: only libc6 and libgcc-s1 unpacked from Debian
#   (plus base-files and netbase), Mozilla's CA bundle, and /etc/passwd and /etc/group naming root,
#   nobody and nonroot (65532) as distroless does; no shell, no package manager; USER 65532.
#
#   bed/docker-bases.sh                     build what is missing; print the build arguments
#   RUST_VERSION=1.95 bed/docker-bases.sh
# The mmdebstrap hooks are single-quoted on purpose: mmdebstrap's shell expands "$1" (the root).
# shellcheck disable=SC2016
set -euo pipefail
shopt -s inherit_errexit
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$here/lib.sh"
suite=bookworm
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
rust_version=${RUST_VERSION:-1.95}
cache=$BED_CACHE/docker-bases
mkdir -p "$cache"
bases_log() { printf '[bed/docker-bases] %s\n' "$*" >&2; }

# The host's active toolchain (rustup's), which must be the RUST_VERSION the Dockerfile names.
toolchain=$(cd "$(rustc --print sysroot)" && pwd -P)
rustc_version=$("$toolchain/bin/rustc" --version)
[[ $rustc_version == "rustc $rust_version."* ]] ||
  { bases_log "the host's $rustc_version is not Rust $rust_version (set RUST_VERSION)"; exit 1; }
# The host's CA bundle: the builder reaches crates.io the way the host does (through whatever TLS
# proxy the host trusts). The runtime image gets Debian's bundle only.
host_cas=${HOST_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
# have IMAGE TARBALL: the image is in the engine, loaded from its cached tarball when it is not.
have() {
  docker image inspect "$1" >/dev/null 2>&1 && return 0
  [[ -f $2 ]] || return 1
  bases_log "loading $1 from $2"
  docker load -i "$2" >&2
}

# import ROOTFS_TAR IMAGE TARBALL CHANGES...: docker import, then save the image as the cached tarball.
import() {
  local rootfs=$1 image=$2 tarball=$3; shift 3
  local changes=() change
  for change in "$@"; do changes+=(--change "$change"); done
  docker import "${changes[@]}" "$rootfs" "$image" >&2
  docker save -o "$tarball.tmp" "$image"
  mv "$tarball.tmp" "$tarball"
}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# build_rust-builder IMAGE: Debian with a C toolchain and cmake, the host's Rust toolchain and CA bundle.
build_rust-builder() {
  # The toolchain without its docs (share/), under /usr/local/rust.
  mkdir -p "$work/rust/usr/local/rust"
  cp -a "$toolchain/bin" "$toolchain/lib" "$toolchain/libexec" "$toolchain/etc" "$work/rust/usr/local/rust/"
  nice -n 10 mmdebstrap --variant=apt --mode=root \
    --include=gcc,libc6-dev,make,cmake,git,ca-certificates,pkg-config \
    --customize-hook="tar -C '$work/rust' -c . | tar -C \"\$1\" -x" \
    --customize-hook='mkdir -p "$1/usr/local/cargo"; chmod 1777 "$1/usr/local/cargo"' \
    --customize-hook="cat '$host_cas' >\"\$1/etc/ssl/certs/ca-certificates.crt\"" \
    --customize-hook='rm -rf "$1"/var/cache/apt/archives/*.deb "$1"/var/lib/apt/lists/*' \
    "$suite" "$work/builder.tar" "$mirror" >&2
  import "$work/builder.tar" "$1" "$cache/rust-builder-$builder_key.tar" \
    'ENV PATH=/usr/local/cargo/bin:/usr/local/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    'ENV CARGO_HOME=/usr/local/cargo' "ENV RUST_VERSION=$rust_version" 'WORKDIR /' 'CMD ["bash"]'
}

# build_runtime IMAGE: libc6 and libgcc-s1 unpacked (variant extract: no maintainer script runs, and
# mmdebstrap runs no hooks either, so the root is finished here), Debian's CA bundle, the distroless
# users, no shell.
build_runtime() {
  local root=$work/runtime
  nice -n 10 mmdebstrap --variant=extract --mode=root --include=base-files,netbase,libc6,libgcc-s1 \
    "$suite" "$root" "$mirror" >&2
  # Debian's CA bundle (Mozilla's CAs, as ca-certificates ships them), taken from the builder image.
  mkdir -p "$root/etc/ssl/certs"
  docker run --rm "$builder" sh -c 'cat /usr/share/ca-certificates/mozilla/*.crt' >"$root/etc/ssl/certs/ca-certificates.crt"
  grep -q 'BEGIN CERTIFICATE' "$root/etc/ssl/certs/ca-certificates.crt" ||
    { bases_log "no CA bundle in $builder"; return 1; }
  printf '%s\n' 'root:x:0:0:root:/root:/sbin/nologin' 'nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin' \
    'nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin' >"$root/etc/passwd"
  printf '%s\n' 'root:x:0:' 'nobody:x:65534:' 'nonroot:x:65532:' >"$root/etc/group"
  chmod 0644 "$root/etc/passwd" "$root/etc/group" "$root/etc/ssl/certs/ca-certificates.crt"
  install -d -m 0700 -o 65532 -g 65532 "$root/home/nonroot"
  install -d -m 0700 "$root/root"
  install -d -m 1777 "$root/tmp"
  rm -rf "$root"/etc/apt "$root"/var/cache/apt "$root"/var/lib/apt "$root"/var/lib/dpkg "$root"/var/log/* \
    "$root"/usr/share/doc "$root"/usr/share/man "$root"/usr/share/info "$root"/usr/share/lintian \
    "$root"/usr/share/locale "$root"/usr/share/common-licenses
  tar -C "$root" -c . >"$work/runtime.tar"
  import "$work/runtime.tar" "$1" "$cache/runtime-$runtime_key.tar" \
    'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' 'USER 65532:65532' 'WORKDIR /home/nonroot'
}

# Each image's key: its recipe (the function's text, without comments), what it takes from the
# host, the Debian suite and mirror. Editing a comment, or the other image's recipe, rebuilds nothing.
builder_key=$( { declare -f build_rust-builder import; cat "$host_cas"; echo "$suite $mirror $rustc_version"; } |
  sha256sum | cut -c1-16)
builder=spot-rebalancer-bed/rust-builder:$builder_key
runtime_key=$( { declare -f build_runtime import; echo "$suite $mirror $builder_key"; } | sha256sum | cut -c1-16)
runtime=spot-rebalancer-bed/runtime:$runtime_key

# ensure NAME IMAGE KEY: IMAGE (repository:KEY) is in the engine, built by build_NAME when neither it
# nor its tarball is cached; stand-ins of other keys (an older toolchain or recipe) are dropped.
ensure() {
  local name=$1 image=$2 key=$3 started=$SECONDS
  local repository=${image%%:*} tarball=$cache/$1-$3.tar
  if ! have "$image" "$tarball"; then
    bases_log "building $image (Debian $suite)"
    "build_$name" "$image"
    bases_log "built $image in $((SECONDS - started)) s"
  fi
  docker image ls "$repository" --format '{{.Tag}}' | while read -r tag; do
    [[ $tag == "$key" ]] || docker rmi "$repository:$tag" >/dev/null 2>&1 || true
  done
  find "$cache" -maxdepth 1 -name "$name-*.tar" ! -name "$name-$key.tar" -delete
}
ensure rust-builder "$builder" "$builder_key"
ensure runtime "$runtime" "$runtime_key"

echo "--build-arg BUILDER_IMAGE=$builder"
echo "--build-arg RUNTIME_IMAGE=$runtime"
