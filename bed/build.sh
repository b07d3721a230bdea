#!/usr/bin/env bash
# Builds the test bed's Go binaries from Go modules and caches them outside the repository, one folder
# per pinned version, so a warm machine skips every build. Prints the bin folder of each on success.
#
#   bed/build.sh            build whatever is missing
#   bed/build.sh helm       one of: etcd kwok imds kubernetes helm kubeconform
#   bed/build.sh kubernetes-node   kubelet, kubeadm, kube-proxy (for kind's node image; not in `all`)
#   bed/build.sh kind | kind-node  kind; what kind's node image holds (bed/kind-node.sh; not in `all`)
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
if [[ $target == kubernetes-node ]]; then
  # The node's binaries for kind's node image (bed/kind-node.sh), not needed by the bed itself; the same
  # version stamp as above (kubeadm picks the control-plane image tags from it).
  minor=${KUBERNETES_VERSION#v1.}; minor=${minor%%.*}
  EXTRA_LDFLAGS=""
  for pkg in k8s.io/client-go/pkg/version k8s.io/component-base/version; do
    EXTRA_LDFLAGS+=" -X $pkg.gitVersion=$KUBERNETES_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    EXTRA_LDFLAGS+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
  done
  EXTRA_LDFLAGS=$EXTRA_LDFLAGS build_wrapped kubernetes-node "$KUBERNETES_VERSION" "$(kubernetes_gomod)" \
    k8s.io/kubernetes/cmd/kubelet k8s.io/kubernetes/cmd/kubeadm k8s.io/kubernetes/cmd/kube-proxy
fi
if [[ $target == kind ]]; then
  build_wrapped kind "$KIND_VERSION" "$(plain_gomod kind sigs.k8s.io/kind "$KIND_VERSION")" sigs.k8s.io/kind
fi
if [[ $target == kind-node ]]; then
  # What kind's base image holds, built as kind v0.33's images/base builds it: containerd without the
  # snapshotters kind leaves out, runc with seccomp (cgo: needs gcc and libseccomp-dev), crictl, and the
  # four CNI plugins kind's CNI uses. Then what the control-plane images need besides Kubernetes itself.
  EXTRA_LDFLAGS="-X github.com/containerd/containerd/v2/version.Version=$CONTAINERD_VERSION" \
    GOFLAGS="$GOFLAGS -tags=no_aufs,no_zfs,no_btrfs,no_devmapper" build_wrapped containerd "$CONTAINERD_VERSION" \
    "$(plain_gomod containerd github.com/containerd/containerd/v2 "$CONTAINERD_VERSION")" \
    github.com/containerd/containerd/v2/cmd/containerd github.com/containerd/containerd/v2/cmd/ctr \
    github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2
  EXTRA_LDFLAGS="-X main.version=${RUNC_VERSION#v}" CGO_ENABLED=1 GOFLAGS="$GOFLAGS -tags=seccomp" \
    build_wrapped runc "$RUNC_VERSION" "$(plain_gomod runc github.com/opencontainers/runc "$RUNC_VERSION")" \
    github.com/opencontainers/runc
  EXTRA_LDFLAGS="-X sigs.k8s.io/cri-tools/pkg/version.Version=$CRICTL_VERSION" build_wrapped crictl "$CRICTL_VERSION" \
    "$(plain_gomod crictl sigs.k8s.io/cri-tools "$CRICTL_VERSION")" sigs.k8s.io/cri-tools/cmd/crictl
  cni=github.com/containernetworking/plugins
  build_wrapped cni-plugins "$CNI_PLUGINS_VERSION" "$(plain_gomod cni-plugins "$cni" "$CNI_PLUGINS_VERSION")" \
    "$cni/plugins/ipam/host-local" "$cni/plugins/main/loopback" "$cni/plugins/main/ptp" "$cni/plugins/meta/portmap"
  ETCD_VERSION=$KIND_ETCD_VERSION
  etcd_bin=$(build_wrapped etcd "$ETCD_VERSION" "$(etcd_gomod)" go.etcd.io/etcd/server/v3)
  [[ -x $etcd_bin/etcd ]] || mv "$etcd_bin/server" "$etcd_bin/etcd"
  echo "$etcd_bin"
  build_wrapped coredns "$COREDNS_VERSION" "$(plain_gomod coredns github.com/coredns/coredns "$COREDNS_VERSION")" \
    github.com/coredns/coredns
  build_wrapped local-path-provisioner "$LOCAL_PATH_PROVISIONER_VERSION" \
    "$(plain_gomod local-path-provisioner github.com/rancher/local-path-provisioner "$LOCAL_PATH_PROVISIONER_VERSION")" \
    github.com/rancher/local-path-provisioner
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
