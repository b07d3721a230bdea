#!/usr/bin/env bash
# Builds kind's node image offline, for machines that cannot pull from a registry (these machines: no
# docker.io, registry.k8s.io or GitHub releases), from Debian packages and Go modules only:
#
# 1. kind v0.33 and the binaries its base image holds, built from Go modules by bed/build.sh (kind,
#    kind-node, kubernetes-node, kubernetes targets): containerd v2, runc (seccomp), crictl, the CNI
#    plugins; kubelet, kubeadm, kube-proxy and the control-plane binaries of the bed's Kubernetes;
#    etcd and CoreDNS at the versions kubeadm names; rancher's local-path-provisioner.
# 2. The base image (stands in for docker.io/kindest/base): Debian bookworm from mmdebstrap with
#    systemd and the packages kind's images/base installs, kind's own files for it (entrypoint, systemd
#    units, containerd config, taken from the kind module) and the binaries above, imported with
#    `docker import` with kind's ENTRYPOINT and STOPSIGNAL. Bookworm, not kind's trixie: trixie's
#    systemd (257) refuses to boot on a cgroup v1 hierarchy, and these machines have cgroup v1.
# 3. Every image the node must hold, under the exact name kubeadm or kind's manifests use, so nothing
#    is pulled: kube-apiserver, kube-controller-manager, kube-scheduler, kube-proxy, etcd, coredns and
#    pause (from the k8s.io/kubernetes module's build/pause source, gcc -static), kind's CNI image
#    (bed/kind/kindnetd, a stand-in: kindnetd's source is not a module the Go proxy serves) and kind's
#    local-path-provisioner and helper. Each is a `docker import` of a small root (a static one, or
#    Debian with iptables/nftables/conntrack/bash for kube-proxy, the CNI and the helper) plus its binary.
# 4. `kind build node-image --type file` from a Kubernetes server tarball laid out as Kubernetes'
#    release is (kubernetes/version, kubernetes/server/bin/{kubeadm,kubelet,kubectl,<image>.tar}).
#    kind loads the four image archives it knows and pulls whatever else kubeadm or its manifests
#    name unless an archive's tags include it; kube-proxy.tar therefore carries the other images too,
#    with its `repositories` index (every tag) as the archive's first entry, which is the index kind
#    reads.
#
# Cached as the Docker image spot-rebalancer-bed/kind-node:<key> and its `docker save` tarball under
# $BED_CACHE/kind-node/, keyed by a hash of this script, the stand-in and bed/versions.env: a warm machine
# builds nothing. Prints the image name.
#
#   bed/kind-node.sh                 build what is missing; print the node image's name
#   KIND_NODE_KEEP_PARTS=1 bed/kind-node.sh   keep the intermediate images (base, control plane)
#
# Needs root (mmdebstrap --mode=root, Docker), gcc, Go and Debian's mirror.
# The mmdebstrap hooks are single-quoted on purpose: mmdebstrap's shell expands "$1" (the root).
# shellcheck disable=SC2016
set -euo pipefail
shopt -s inherit_errexit
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$here/lib.sh"
suite=bookworm
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
cache=$BED_CACHE/kind-node
mkdir -p "$cache"
knlog() { printf '[bed/kind-node] %s\n' "$*" >&2; }
# timed WHAT COMMAND...: runs COMMAND and prints how long it took (the figures scripts/e2e-kind reports).
timed() {
  local what=$1 started=$SECONDS; shift
  "$@"
  knlog "$what: $((SECONDS - started)) s"
}

key=$( { cat "${BASH_SOURCE[0]}" "$here/kind/kindnetd" "$here/versions.env"; echo "$suite $mirror"; } |
  sha256sum | cut -c1-16)
node_image=spot-rebalancer-bed/kind-node:$key
tarball=$cache/kind-node-$key.tar
if docker image inspect "$node_image" >/dev/null 2>&1; then echo "$node_image"; exit 0; fi
if [[ -f $tarball ]]; then
  timed "loaded $node_image from $tarball" docker load -i "$tarball" >&2
  echo "$node_image"
  exit 0
fi

# 1. The binaries (each cached by version by bed/build.sh).
timed "Go builds (kind)" "$here/build.sh" kind >/dev/null
timed "Go builds (containerd, runc, crictl, CNI plugins, etcd, CoreDNS, local-path-provisioner)" \
  "$here/build.sh" kind-node >/dev/null
timed "Go builds (kubelet, kubeadm, kube-proxy)" "$here/build.sh" kubernetes-node >/dev/null
timed "Go builds (control plane, kubectl)" "$here/build.sh" kubernetes >/dev/null
bin() { echo "$BED_CACHE/$1/bin"; }
kind=$(bin "kind-$KIND_VERSION")/kind
node_bin=$(bin "kubernetes-node-$KUBERNETES_VERSION")
# kind's files for its base image, from the kind module (the same version as the kind binary).
kind_src=$(cd "$cache" && GOFLAGS=-mod=mod GOTOOLCHAIN=local go mod download -json "sigs.k8s.io/kind@$KIND_VERSION" |
  jq -r .Dir)
k8s_src=$(cd "$cache" && GOFLAGS=-mod=mod GOTOOLCHAIN=local go mod download -json "k8s.io/kubernetes@$KUBERNETES_VERSION" |
  jq -r .Dir)

# The images' names, as kubeadm, kind's containerd config and kind's manifests spell them.
mapfile -t kubeadm_images < <("$node_bin/kubeadm" config images list --kubernetes-version "$KUBERNETES_VERSION")
kubeadm_image() { printf '%s\n' "${kubeadm_images[@]}" | grep -m1 "/$1:"; }
kind_const() { sed -n "s/^const $1 = \"\(.*\)\"$/\1/p" "$kind_src/pkg/build/nodeimage/$2"; }
pause_image=$(sed -n 's/^ *sandbox_image = "\(.*\)"$/\1/p' "$kind_src/images/base/files/etc/containerd/config.toml")
kindnetd_image=$(kind_const kindnetdImage const_cni.go)
provisioner_image=$(kind_const storageProvisionerImage const_storage.go)
helper_image=$(kind_const storageHelperImage const_storage.go)
for name in pause_image kindnetd_image provisioner_image helper_image; do
  [[ -n ${!name} ]] || { knlog "cannot read $name from kind $KIND_VERSION's sources ($kind_src)"; exit 1; }
done

work=$(mktemp -d "$cache/work.XXXXXX")
trap 'rm -rf "$work"' EXIT

# 2. The base image.
build_base() {
  local files=$kind_src/images/base/files extra=$work/base-extra
  mkdir -p "$extra/usr/local/bin" "$extra/usr/local/sbin" "$extra/opt/cni/bin"
  cp "$(bin "containerd-$CONTAINERD_VERSION")"/{containerd,ctr,containerd-shim-runc-v2} "$extra/usr/local/bin/"
  cp "$(bin "crictl-$CRICTL_VERSION")/crictl" "$extra/usr/local/bin/"
  cp "$(bin "runc-$RUNC_VERSION")/runc" "$extra/usr/local/sbin/"
  cp "$(bin "cni-plugins-$CNI_PLUGINS_VERSION")"/{host-local,loopback,ptp,portmap} "$extra/opt/cni/bin/"
  # kind's files with the modes its Dockerfile gives them (the module cache's copies are read-only).
  cp -r "$files/." "$extra/"
  chmod -R u+w "$extra"
  find "$extra/etc" "$extra/kind" "$extra/LICENSES" -type f -exec chmod 0644 {} +
  chmod 0755 "$extra"/usr/local/bin/* "$extra"/usr/local/sbin/* "$extra"/opt/cni/bin/* "$extra"/kind/bin/*
  # Keep pods' oom_score_adj at or above containerd's own, as kind does for rootless nodes: lowering it
  # takes CAP_SYS_RESOURCE, which nodes on machines that lack it (bed/kind-runtime.sh) do not get.
  sed -i 's/restrict_oom_score_adj = false/restrict_oom_score_adj = true/' "$extra/etc/containerd/config.toml"
  grep -q 'restrict_oom_score_adj = true' "$extra/etc/containerd/config.toml"
  # containerd's default OCI spec with kind's hook (the product_uuid mount) and no rlimits, as kind's
  # Dockerfile makes it.
  "$extra/usr/local/bin/ctr" oci spec |
    jq '.hooks.createContainer[.hooks.createContainer | length] |= . + {"path": "/kind/bin/mount-product-files.sh"}' |
    jq 'del(.process.rlimits)' >"$extra/etc/containerd/cri-base.json"
  # nfs-common and open-iscsi (storage tests) and fuse-overlayfs (rootless) are left out: not needed here.
  nice -n 15 mmdebstrap --variant=minbase --mode=root \
    --include=systemd,conntrack,iptables,nftables,iproute2,ethtool,util-linux,mount,kmod,libseccomp2,pigz,e2fsprogs,bash,ca-certificates,curl,jq,procps \
    --customize-hook="tar -C '$extra' -c . | tar -C \"\$1\" -x --no-same-owner" \
    --customize-hook='find "$1/lib/systemd/system/sysinit.target.wants/" -name systemd-tmpfiles-setup.service -delete' \
    --customize-hook='rm -f "$1"/lib/systemd/system/multi-user.target.wants/* "$1"/etc/systemd/system/*.wants/* "$1"/lib/systemd/system/local-fs.target.wants/* "$1"/lib/systemd/system/sockets.target.wants/*udev* "$1"/lib/systemd/system/sockets.target.wants/*initctl* "$1"/lib/systemd/system/basic.target.wants/*' \
    --customize-hook='echo ReadKMsg=no >>"$1/etc/systemd/journald.conf"; ln -sf /usr/lib/systemd/systemd "$1/sbin/init"' \
    --customize-hook='systemctl --root="$1" enable kubelet.service containerd.service undo-mount-hacks.service; systemctl --root="$1" mask systemd-binfmt.service' \
    --customize-hook='mkdir -p "$1/etc/kubernetes/manifests"; rm -rf "$1"/var/cache/apt/archives/*.deb "$1"/var/lib/apt/lists/*' \
    "$suite" "$work/base.tar" "$mirror" >&2
  docker import --change 'ENV container=docker' \
    --change 'ENTRYPOINT ["/usr/local/bin/entrypoint", "/sbin/init"]' "$work/base.tar" "$base_image" >&2
  rm -f "$work/base.tar"
  # `docker import` takes no STOPSIGNAL; a build step with no RUN adds it (nothing is pulled).
  printf 'FROM %s\nSTOPSIGNAL SIGRTMIN+3\n' "$base_image" | DOCKER_BUILDKIT=0 docker build -q -t "$base_image" - >&2
}

# 3. The images the node holds.
# Two roots, imported as images: one for static binaries (as distroless/static: users, CA bundle, /tmp;
# root by default, as the upstream control-plane images run), and Debian with the networking tools.
build_roots() {
  local static_root=$work/static-root
  mkdir -p "$static_root"/{etc/ssl/certs,tmp,usr/local/bin}
  printf '%s\n' 'root:x:0:0:root:/root:/sbin/nologin' 'nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin' \
    'nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin' >"$static_root/etc/passwd"
  printf '%s\n' 'root:x:0:' 'nobody:x:65534:' 'nonroot:x:65532:' >"$static_root/etc/group"
  cp /etc/ssl/certs/ca-certificates.crt "$static_root/etc/ssl/certs/"
  chmod 1777 "$static_root/tmp"
  tar -c -C "$static_root" . | docker import - "$static_image" >/dev/null
  nice -n 15 mmdebstrap --variant=minbase --mode=root \
    --include=bash,ca-certificates,curl,jq,iproute2,iptables,nftables,ipset,conntrack,kmod \
    --customize-hook='rm -rf "$1"/var/cache/apt/archives/*.deb "$1"/var/lib/apt/lists/* "$1"/usr/share/doc "$1"/usr/share/man "$1"/usr/share/locale' \
    "$suite" "$work/tools.tar" "$mirror" >&2
  docker import "$work/tools.tar" "$tools_image" >/dev/null
  rm -f "$work/tools.tar"
}

# image BASE NAME ENTRYPOINT_JSON FILE:DEST...: BASE plus each FILE at DEST, built as NAME (a build with
# no RUN: nothing is pulled).
image() {
  local base=$1 name=$2 entrypoint=$3 context spec; shift 3
  context=$(mktemp -d "$work/context.XXXXXX")
  mkdir -p "$context/files"
  for spec in "$@"; do
    install -D -m 0755 "${spec%%:*}" "$context/files/${spec#*:}"
  done
  printf 'FROM %s\nCOPY files/ /\nENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\nENTRYPOINT %s\n' \
    "$base" "$entrypoint" >"$context/Dockerfile"
  DOCKER_BUILDKIT=0 docker build -q -t "$name" "$context" >/dev/null 2>"$context/err" ||
    { cat "$context/err" >&2; return 1; }
  rm -rf "$context"
  knlog "image $name"
}

build_images() {
  local kbin etcd_bin
  kbin=$(bin "kubernetes-$KUBERNETES_VERSION")
  etcd_bin=$(bin "etcd-$KIND_ETCD_VERSION")
  gcc -Os -Wall -Werror -static -DVERSION="$KUBERNETES_VERSION-bed" -o "$work/pause" "$k8s_src/build/pause/linux/pause.c"
  local c
  for c in kube-apiserver kube-controller-manager kube-scheduler; do
    image "$static_image" "$(kubeadm_image "$c")" "[\"/usr/local/bin/$c\"]" "$kbin/$c:usr/local/bin/$c"
  done
  image "$tools_image" "$(kubeadm_image kube-proxy)" '["/usr/local/bin/kube-proxy"]' \
    "$node_bin/kube-proxy:usr/local/bin/kube-proxy"
  image "$static_image" "$(kubeadm_image etcd)" '["/usr/local/bin/etcd"]' \
    "$etcd_bin/etcd:usr/local/bin/etcd"
  image "$static_image" "$(kubeadm_image coredns)" '["/coredns"]' \
    "$(bin "coredns-$COREDNS_VERSION")/coredns:coredns"
  image "$static_image" "$pause_image" '["/pause"]' "$work/pause:pause"
  image "$tools_image" "$kindnetd_image" '["/bin/kindnetd"]' "$here/kind/kindnetd:usr/bin/kindnetd"
  image "$static_image" "$provisioner_image" '["/usr/local/bin/local-path-provisioner"]' \
    "$(bin "local-path-provisioner-$LOCAL_PATH_PROVISIONER_VERSION")/local-path-provisioner:usr/local/bin/local-path-provisioner"
  image "$tools_image" "$helper_image" '["/bin/sh"]'
}

# save_first_index ARCHIVE IMAGE...: `docker save` of the images, rewritten with its `repositories`
# index (all tags) as the first entry, where kind looks for the archive's tags.
save_first_index() {
  local archive=$1 dir; shift
  dir=$(mktemp -d "$work/save.XXXXXX")
  docker save "$@" | tar -C "$dir" -x
  [[ -f $dir/repositories ]] || { knlog "docker save wrote no repositories index"; return 1; }
  # Docker writes Docker Hub's names short (kindest/kindnetd); kind compares the full ones.
  local full='def full: if (split("/")[0] | test("[.:]")) or . == "localhost" then . else "docker.io/" + . end;'
  jq -c "$full with_entries(.key |= full)" "$dir/repositories" >"$dir/repositories.new"
  jq -c "$full map(.RepoTags |= map(full))" "$dir/manifest.json" >"$dir/manifest.json.new"
  mv "$dir/repositories.new" "$dir/repositories"
  mv "$dir/manifest.json.new" "$dir/manifest.json"
  (cd "$dir" && find . -mindepth 1 -maxdepth 1 ! -name repositories -printf '%P\n' | sort |
    tar -c -f "$archive" repositories -T -)
  rm -rf "$dir"
}

# 4. The Kubernetes tarball and the node image.
build_node() {
  local k=$work/kubernetes server
  server=$k/server/bin
  mkdir -p "$server"
  echo "$KUBERNETES_VERSION" >"$k/version"
  cp "$node_bin/kubeadm" "$node_bin/kubelet" "$(bin "kubernetes-$KUBERNETES_VERSION")/kubectl" "$server/"
  local c
  for c in kube-apiserver kube-controller-manager kube-scheduler; do
    docker save -o "$server/$c.tar" "$(kubeadm_image "$c")"
  done
  local others=()
  mapfile -t others < <(printf '%s\n' "${kubeadm_images[@]}" | grep -v -e /kube-apiserver: -e /kube-controller-manager: \
    -e /kube-scheduler: -e /kube-proxy: -e /pause:)
  save_first_index "$server/kube-proxy.tar" "$(kubeadm_image kube-proxy)" "${others[@]}" "$pause_image" \
    "$kindnetd_image" "$provisioner_image" "$helper_image"
  tar -C "$work" -czf "$work/kubernetes-server-linux-amd64.tar.gz" kubernetes
  rm -rf "$k"
  nice -n 15 "$kind" build node-image --type file --base-image "$base_image" --image "$node_image" \
    "$work/kubernetes-server-linux-amd64.tar.gz" >&2
}

# The base image and the roots have keys of their own (their recipe, the versions, the Debian suite),
# so editing the rest of this script rebuilds neither.
part_key() { { declare -f "$1"; cat "$here/versions.env"; echo "$suite $mirror"; } | sha256sum | cut -c1-16; }
base_image=spot-rebalancer-bed/kind-base:$(part_key build_base)
static_image=spot-rebalancer-bed/kind-static:$(part_key build_roots)
tools_image=spot-rebalancer-bed/kind-tools:$(part_key build_roots)
docker image inspect "$base_image" >/dev/null 2>&1 || timed "base image $base_image (mmdebstrap, docker import)" build_base
docker image inspect "$tools_image" >/dev/null 2>&1 || timed "roots for the control-plane images (mmdebstrap)" build_roots
timed "control-plane, CNI and storage images" build_images
timed "node image $node_image (kind build node-image)" build_node
timed "cached as $tarball" docker save -o "$tarball.tmp" "$node_image"
mv "$tarball.tmp" "$tarball"

# The parts live on in the node image; drop them (and node images of other keys) unless asked not to.
if [[ ${KIND_NODE_KEEP_PARTS:-0} != 1 ]]; then
  docker rmi "$(kubeadm_image kube-apiserver)" "$(kubeadm_image kube-controller-manager)" \
    "$(kubeadm_image kube-scheduler)" "$(kubeadm_image kube-proxy)" "$(kubeadm_image etcd)" \
    "$(kubeadm_image coredns)" "$pause_image" "$kindnetd_image" "$provisioner_image" "$helper_image" \
    "$base_image" "$static_image" "$tools_image" >/dev/null
fi
docker image ls spot-rebalancer-bed/kind-node --format '{{.Tag}}' | while read -r tag; do
  [[ $tag == "$key" ]] || docker rmi "spot-rebalancer-bed/kind-node:$tag" >/dev/null 2>&1 || true
done
find "$cache" -maxdepth 1 -name 'kind-node-*.tar' ! -name "kind-node-$key.tar" -delete
echo "$node_image"
