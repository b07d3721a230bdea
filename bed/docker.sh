#!/usr/bin/env bash
# Makes a Docker engine available, as the rest of bed/ makes its tools available: installs Debian's
# docker.io when there is no dockerd, and starts dockerd (as root, in the background) when no engine
# answers. A dockerd this script started is recorded in $BED_CACHE/dockerd.pid; `bed/docker.sh stop`
# stops that one and never one it did not start.
#
#   bed/docker.sh          ensure an engine answers; prints "started" or "running"
#   bed/docker.sh stop     stop the dockerd this script started, if any
set -euo pipefail
shopt -s inherit_errexit
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$here/lib.sh"
mkdir -p "$BED_CACHE"
pidfile=$BED_CACHE/dockerd.pid
log=$BED_CACHE/dockerd.log
docker_log() { printf '[bed/docker] %s\n' "$*" >&2; }

if [[ ${1:-} == stop ]]; then
  stop_pidfile "$pidfile"
  exit 0
fi

if docker info >/dev/null 2>&1; then
  echo running
  exit 0
fi
sudo=()
((EUID == 0)) || sudo=(sudo)
if ! command -v dockerd >/dev/null; then
  docker_log "installing Debian's docker.io (no dockerd on this machine)"
  "${sudo[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends docker.io >&2
fi
if docker info >/dev/null 2>&1; then
  echo running
  exit 0
fi
docker_log "starting dockerd (log: $log)"
# setsid: dockerd outlives this script and is not in the caller's process group. nice: builds and
# containers inherit it, and share the machine's CPUs with everything else at a lower priority.
"${sudo[@]}" setsid nice -n 10 dockerd >"$log" 2>&1 </dev/null &
echo $! >"$pidfile"
for _ in $(seq 120); do
  if docker info >/dev/null 2>&1; then
    echo started
    exit 0
  fi
  kill -0 "$(cat "$pidfile")" 2>/dev/null || { tail -20 "$log" >&2; docker_log "dockerd exited"; exit 1; }
  sleep 0.5
done
docker_log "dockerd did not answer within 60 s"; tail -20 "$log" >&2
exit 1
