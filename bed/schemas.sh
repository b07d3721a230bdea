#!/usr/bin/env bash
# Makes (once, cached by Kubernetes version) the strict, standalone JSON schemas kubeconform validates
# the chart against, and prints the folder to pass as its -schema-location. kubeconform would download
# them from GitHub, which CI cannot reach; they are generated here from the OpenAPI v2 document of the
# pinned Kubernetes, `api/openapi-spec/swagger.json` of the k8s.io/kubernetes module (already in the Go
# module cache once bed/build.sh has built the bed's Kubernetes; else fetched from the Go module proxy).
# That document covers every built-in API group, alpha ones too; a running API server's /openapi/v2
# serves the same types less the groups it has disabled. It needs no running bed, so the result is
# the same on every machine.
set -euo pipefail
shopt -s inherit_errexit
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

out="$BED_CACHE/kube-schemas-$KUBERNETES_VERSION"
if [[ -f $out/.complete ]]; then echo "$out"; exit 0; fi

bed_log "schemas: from the OpenAPI document of k8s.io/kubernetes $KUBERNETES_VERSION"
dir=$(GOFLAGS=-mod=mod GOTOOLCHAIN=local go mod download -json "k8s.io/kubernetes@$KUBERNETES_VERSION" |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["Dir"])')
rm -rf "$out"
python3 "$bed_here/openapi2jsonschema.py" "$dir/api/openapi-spec/swagger.json" "$out" "$KUBERNETES_VERSION"
touch "$out/.complete"
echo "$out"
