# Shared settings of the bed scripts: where things are cached, where a running bed keeps its state.
# shellcheck shell=bash
bed_here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo_root=$(cd "$bed_here/.." && pwd)
# shellcheck source=bed/versions.env
source "$bed_here/versions.env"

# Built binaries and virtual environments, keyed by version, outside the repository.
BED_CACHE=${BED_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/spot-rebalancer-bed}
# State of the running bed: kubeconfig, pid files, logs, the env file tests read.
BED_DIR=${BED_DIR:-$repo_root/.bed}
BED_CLUSTER=${BED_CLUSTER:-spot-bed}
export BED_CACHE BED_DIR BED_CLUSTER

# Used by the scripts that source this file.
# shellcheck disable=SC2034
{
  kubernetes_bin="$BED_CACHE/kubernetes-$KUBERNETES_VERSION/bin"
  etcd_bin="$BED_CACHE/etcd-$ETCD_VERSION/bin"
  kwok_bin="$BED_CACHE/kwok-$KWOK_VERSION/bin"
  imds_bin="$BED_CACHE/ec2-metadata-mock-$EC2_METADATA_MOCK_VERSION/bin"
}

bed_log() { printf '[bed] %s\n' "$*" >&2; }

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# stop_pidfile FILE: SIGTERM the process named in FILE, SIGKILL it after 5 s, remove FILE.
stop_pidfile() {
  local file=$1 pid
  [[ -f $file ]] || return 0
  pid=$(cat "$file")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$file"
}
