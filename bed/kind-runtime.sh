#!/usr/bin/env bash
# Makes `docker run --privileged` work where the machine's capability bounding set lacks
# CAP_SYS_RESOURCE (these test VMs), which kind needs for its nodes and its node-image build: installs
# bed/kind/runc-without-sys-resource as Docker's default runtime (/etc/docker/daemon.json, merged with
# what is there) and reloads dockerd (SIGHUP: running containers are not touched). Does nothing where a
# privileged container already starts.
#
#   bed/kind-runtime.sh     prints "ok" (nothing to do) or "installed"
set -euo pipefail
shopt -s inherit_errexit
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$here/lib.sh"
rtlog() { printf '[bed/kind-runtime] %s\n' "$*" >&2; }
"$here/docker.sh" >/dev/null
probe_image=${1:?usage: bed/kind-runtime.sh IMAGE (any local image with /bin/true)}
privileged() { docker run --rm --privileged --entrypoint /bin/true "$probe_image" >/dev/null 2>&1; }
if privileged; then echo ok; exit 0; fi
grep -q '^CapBnd:' /proc/self/status
rtlog "a privileged container does not start here ($(grep '^CapBnd:' /proc/self/status | tr -s '\t ' ' '))"
wrapper=$BED_CACHE/bin/runc-without-sys-resource
mkdir -p "$BED_CACHE/bin"
install -m 0755 "$here/kind/runc-without-sys-resource" "$wrapper"
sudo=()
((EUID == 0)) || sudo=(sudo)
config=/etc/docker/daemon.json
current='{}'
[[ -f $config ]] && current=$(cat "$config")
jq --arg path "$wrapper" '.runtimes["runc-without-sys-resource"] = {path: $path}
  | ."default-runtime" = "runc-without-sys-resource"' <<<"$current" | "${sudo[@]}" tee "$config.tmp" >/dev/null
"${sudo[@]}" mkdir -p /etc/docker
"${sudo[@]}" mv "$config.tmp" "$config"
# The dockerd bed/docker.sh started (its pid file), else the one dockerd there is.
dockerd_pid=$(cat "$BED_CACHE/dockerd.pid" 2>/dev/null || pidof -s dockerd)
"${sudo[@]}" kill -HUP "$dockerd_pid"
for _ in $(seq 20); do
  if privileged; then rtlog "installed $wrapper as Docker's default runtime"; echo installed; exit 0; fi
  sleep 0.5
done
rtlog "a privileged container still does not start"
docker run --rm --privileged --entrypoint /bin/true "$probe_image" >&2 || true
exit 1
