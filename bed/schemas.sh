#!/usr/bin/env bash
# Makes (once, cached by Kubernetes version) the strict, standalone JSON schemas kubeconform validates
# the chart against, and prints the folder to pass as its -schema-location. kubeconform would download
# them from GitHub, which CI cannot reach; they are generated here from the OpenAPI v2 document of the
# pinned Kubernetes: the running bed's API server (`/openapi/v2`) when one is up, else the
# `api/openapi-spec/swagger.json` of the k8s.io/kubernetes module from the Go module proxy.
set -euo pipefail
shopt -s inherit_errexit
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

out="$BED_CACHE/kube-schemas-$KUBERNETES_VERSION"
if [[ -f $out/.complete ]]; then echo "$out"; exit 0; fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
spec="$work/swagger.json"
if [[ -f $BED_DIR/env ]] && "$kubernetes_bin/kubectl" --kubeconfig "$BED_DIR/kubeconfig" \
  --request-timeout=10s get --raw /openapi/v2 >"$spec" 2>/dev/null; then
  bed_log "schemas: OpenAPI v2 from the running bed's API server"
else
  bed_log "schemas: OpenAPI v2 from k8s.io/kubernetes $KUBERNETES_VERSION (Go module proxy)"
  dir=$(GOFLAGS=-mod=mod go mod download -json "k8s.io/kubernetes@$KUBERNETES_VERSION" |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["Dir"])')
  cp "$dir/api/openapi-spec/swagger.json" "$spec"
fi
rm -rf "$out"
python3 "$bed_here/openapi2jsonschema.py" "$spec" "$out" "$KUBERNETES_VERSION"
touch "$out/.complete"
echo "$out"
