#!/usr/bin/env bash
# Builds cargo-deny from its crates.io source (never a downloaded binary) once, cached by version
# outside the repository, and prints the path of the binary.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
root="$BED_CACHE/cargo-deny-$CARGO_DENY_VERSION"
if [[ ! -x $root/bin/cargo-deny ]]; then
  bed_log "building cargo-deny $CARGO_DENY_VERSION into $root (once)"
  rm -rf "$root.tmp"
  # Its own temporary target folder, so no worktree's target is touched; --locked: the versions its
  # release was tested with.
  env -u CARGO_TARGET_DIR nice cargo install --quiet --locked --root "$root.tmp" cargo-deny \
    --version "$CARGO_DENY_VERSION" >&2
  mv "$root.tmp" "$root"
fi
echo "$root/bin/cargo-deny"
