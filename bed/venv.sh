#!/usr/bin/env bash
# Creates (once, cached by the requirements' hash) the Python environment with moto and the bed
# launcher's dependencies, and prints its path.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
req="$bed_here/aws/requirements.txt"
venv="$BED_CACHE/venv-moto-$(cat "$req" "$bed_here/aws/constraints.txt" | sha256sum | cut -c1-12)"
if [[ ! -x $venv/bin/python ]]; then
  bed_log "creating $venv"
  rm -rf "$venv.tmp"
  python3 -m venv "$venv.tmp"
  "$venv.tmp/bin/pip" install --quiet --disable-pip-version-check -r "$req" >&2
  mv "$venv.tmp" "$venv"
fi
echo "$venv"
