#!/usr/bin/env bash
# Builds the test bed's Go binaries from Go modules and caches them outside the repository, one folder
# per pinned version, so a warm machine skips every build. Prints the bin folder of each on success.
#
#   bed/build.sh            build whatever is missing
#   bed/build.sh helm       one of: etcd kwok imds kubernetes helm kubeconform
#   BED_CACHE=/path bed/build.sh
set -euo pipefail
shopt -s inherit_errexit

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=bed/versions.env
source "$here/versions.env"
cache=${BED_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/spot-rebalancer-bed}
mkdir -p "$cache"
export GOFLAGS="-mod=mod -trimpath" CGO_ENABLED=0 GOTOOLCHAIN=local

log() { printf '[bed/build] %s\n' "$*" >&2; }

# build_wrapped NAME VERSION GO_MOD_BODY PACKAGES...: builds PACKAGES (each at VERSION of its module)
# inside a throw-away wrapper module; needed where the upstream go.mod has replace directives that
# `go install pkg@version` refuses.
build_wrapped() {
  local name=$1 key=$2 gomod=$3; shift 3
  local out="$cache/$name-$key"
  if [[ -f "$out/.complete" ]]; then echo "$out/bin"; return; fi
  log "building $name $key (cold: this takes a while)"
  local src="$cache/src/$name-$key"
  rm -rf "$src" "$out"; mkdir -p "$src" "$out/bin"
  printf '%s\n' "$gomod" >"$src/go.mod"
  local started=$SECONDS
  (
    cd "$src"
    for pkg in "$@"; do go get "$pkg@$key"; done
    go build -ldflags="-s -w ${EXTRA_LDFLAGS:-}" -o "$out/bin/" "$@"
  )
  touch "$out/.complete"
  log "built $name $key in $((SECONDS - started)) s"
  echo "$out/bin"
}

kubernetes_gomod() {
  local staging=(api apiextensions-apiserver apimachinery apiserver cli-runtime client-go cloud-provider
    cluster-bootstrap code-generator component-base component-helpers controller-manager cri-api
    cri-client cri-streaming csi-translation-lib dynamic-resource-allocation endpointslice externaljwt
    kms kube-aggregator kube-controller-manager kube-proxy kube-scheduler kubectl kubelet metrics
    mount-utils pod-security-admission sample-apiserver sample-cli-plugin sample-controller streaming)
  echo "module bed.local/kubernetes"
  echo "go 1.26.0"
  echo "require k8s.io/kubernetes $KUBERNETES_VERSION"
  echo "replace ("
  for m in "${staging[@]}"; do echo "  k8s.io/$m => k8s.io/$m $KUBERNETES_STAGING_VERSION"; done
  echo ")"
}

etcd_gomod() {
  cat <<MOD
module bed.local/etcd
go 1.26.0
require go.etcd.io/etcd/server/v3 $ETCD_VERSION
replace (
  go.etcd.io/etcd/api/v3 => go.etcd.io/etcd/api/v3 $ETCD_VERSION
  go.etcd.io/etcd/client/pkg/v3 => go.etcd.io/etcd/client/pkg/v3 $ETCD_VERSION
  go.etcd.io/etcd/client/v3 => go.etcd.io/etcd/client/v3 $ETCD_VERSION
  go.etcd.io/etcd/pkg/v3 => go.etcd.io/etcd/pkg/v3 $ETCD_VERSION
)
MOD
}

plain_gomod() { printf 'module bed.local/%s\ngo 1.26.0\nrequire %s %s\n' "$1" "$2" "$3"; }

target=${1:-all}
if [[ $target == all || $target == etcd ]]; then
  etcd_bin=$(build_wrapped etcd "$ETCD_VERSION" "$(etcd_gomod)" go.etcd.io/etcd/server/v3)
  # The main package lives in the module's server/ folder; give the binary its usual name.
  [[ -x $etcd_bin/etcd ]] || mv "$etcd_bin/server" "$etcd_bin/etcd"
  echo "$etcd_bin"
fi
if [[ $target == all || $target == kwok ]]; then
  build_wrapped kwok "$KWOK_VERSION" "$(plain_gomod kwok sigs.k8s.io/kwok "$KWOK_VERSION")" \
    sigs.k8s.io/kwok/cmd/kwok sigs.k8s.io/kwok/cmd/kwokctl
fi
if [[ $target == all || $target == imds ]]; then
  build_wrapped ec2-metadata-mock "$EC2_METADATA_MOCK_VERSION" \
    "$(plain_gomod ec2-metadata-mock github.com/aws/amazon-ec2-metadata-mock "$EC2_METADATA_MOCK_VERSION")" \
    github.com/aws/amazon-ec2-metadata-mock/cmd/ec2-metadata-mock
fi
if [[ $target == all || $target == kubernetes ]]; then
  # Stamp the version the way Kubernetes' own build does, so `kubectl version` and clients see it.
  minor=${KUBERNETES_VERSION#v1.}; minor=${minor%%.*}
  EXTRA_LDFLAGS=""
  for pkg in k8s.io/client-go/pkg/version k8s.io/component-base/version; do
    EXTRA_LDFLAGS+=" -X $pkg.gitVersion=$KUBERNETES_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    EXTRA_LDFLAGS+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
  done
  EXTRA_LDFLAGS=$EXTRA_LDFLAGS build_wrapped kubernetes "$KUBERNETES_VERSION" "$(kubernetes_gomod)" \
    k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
    k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubectl
fi
if [[ $target == all || $target == helm ]]; then
  # Stamp the version as Helm's own Makefile does (`helm version` shows it).
  EXTRA_LDFLAGS="-X helm.sh/helm/v4/internal/version.version=$HELM_VERSION -X helm.sh/helm/v4/internal/version.gitTreeState=clean" \
    build_wrapped helm "$HELM_VERSION" "$(plain_gomod helm helm.sh/helm/v4 "$HELM_VERSION")" \
    helm.sh/helm/v4/cmd/helm
fi
if [[ $target == all || $target == kubeconform ]]; then
  EXTRA_LDFLAGS="-X main.version=$KUBECONFORM_VERSION" build_wrapped kubeconform "$KUBECONFORM_VERSION" \
    "$(plain_gomod kubeconform github.com/yannh/kubeconform "$KUBECONFORM_VERSION")" \
    github.com/yannh/kubeconform/cmd/kubeconform
fi
