#!/usr/bin/env bash
# Takes the test bed down: the launcher, the cluster's processes, and anything a test left running
# from the bed's binaries. Frees every port it used. Safe to run when nothing is up.
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# The demo's roles and IMDS mock first (scripts/demo), while the API server is still there for them.
for pidfile in "$BED_DIR"/demo/*.pid; do stop_pidfile "$pidfile"; done
stop_pidfile "$BED_DIR/launcher.pid"
if [[ -d $BED_DIR/kwok ]]; then
  KWOK_WORKDIR="$BED_DIR/kwok" "$kwok_bin/kwokctl" delete cluster --name "$BED_CLUSTER" >/dev/null 2>&1 || true
fi
# Whatever is still running from this bed (a component kwokctl lost track of: their command lines
# name files in $BED_DIR) or from this checkout's binary (a role a killed test left behind) is
# stopped too. Other beds and checkouts on the machine are left alone.
leftovers=("$BED_DIR/" "$repo_root/target/[^ ]*/spot-rebalancer( |$)")
for signal in TERM KILL; do
  for pattern in "${leftovers[@]}"; do pkill "-$signal" -f "$pattern" 2>/dev/null || true; done
  [[ $signal == TERM ]] && sleep 0.5
done
rm -rf "$BED_DIR"
bed_log "bed down"
