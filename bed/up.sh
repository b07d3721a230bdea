#!/usr/bin/env bash
# Brings the test bed up: a real Kubernetes control plane (etcd, kube-apiserver, controller-manager,
# scheduler, kwok) started by kwokctl from locally built binaries, and moto's Auto Scaling API behind the
# bed launcher with its node bridge. Writes $BED_DIR/env for the tests and prints it.
#
#   bed/up.sh       build what is missing (cached), start everything, wait until it answers
#   bed/down.sh     stop everything it started
set -euo pipefail
shopt -s inherit_errexit
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
started=$SECONDS

"$bed_here/build.sh" >/dev/null

# Python side: moto and the launcher, in a virtual environment keyed by the requirements' hash.
venv=$("$bed_here/venv.sh")

if [[ -f $BED_DIR/env ]]; then
  bed_log "a bed is already up ($BED_DIR/env); run bed/down.sh first"
  exit 1
fi
mkdir -p "$BED_DIR"
# If anything below fails, take down what was started so no process is left behind.
trap '"$bed_here/down.sh" >/dev/null 2>&1 || true' ERR

export KWOK_WORKDIR="$BED_DIR/kwok"
kubeconfig="$BED_DIR/kubeconfig"
apiserver_port=$(free_port)
bed_log "starting cluster $BED_CLUSTER (Kubernetes $KUBERNETES_VERSION, API server on 127.0.0.1:$apiserver_port)"
"$kwok_bin/kwokctl" create cluster --name "$BED_CLUSTER" --runtime binary \
  --kube-apiserver-binary "$kubernetes_bin/kube-apiserver" \
  --kube-controller-manager-binary "$kubernetes_bin/kube-controller-manager" \
  --kube-scheduler-binary "$kubernetes_bin/kube-scheduler" \
  --etcd-binary "$etcd_bin/etcd" \
  --kwok-controller-binary "$kwok_bin/kwok" \
  --kube-apiserver-port "$apiserver_port" \
  --kubeconfig "$kubeconfig" \
  --wait 3m >"$BED_DIR/kwokctl.log" 2>&1 || { cat "$BED_DIR/kwokctl.log" >&2; false; }

kubectl=("$kubernetes_bin/kubectl" --kubeconfig "$kubeconfig")
until "${kubectl[@]}" get --raw /readyz >/dev/null 2>&1; do
  (( SECONDS - started < 180 )) || { bed_log "API server not ready after 180 s"; false; }
  sleep 0.5
done

aws_port=$(free_port)
bed_log "starting moto and the node bridge on 127.0.0.1:$aws_port"
"$venv/bin/python" -u "$bed_here/aws/launcher.py" --host 127.0.0.1 --port "$aws_port" \
  --kubeconfig "$kubeconfig" --boot-delay "${BED_BOOT_DELAY:-2}" \
  --launch-delay "${BED_LAUNCH_DELAY:-1}" --termination-delay "${BED_TERMINATION_DELAY:-1}" \
  >"$BED_DIR/launcher.out" 2>"$BED_DIR/launcher.log" &
echo $! >"$BED_DIR/launcher.pid"
until grep -q '^READY' "$BED_DIR/launcher.out" 2>/dev/null; do
  kill -0 "$(cat "$BED_DIR/launcher.pid")" 2>/dev/null || { cat "$BED_DIR/launcher.log" >&2; false; }
  (( SECONDS - started < 240 )) || { bed_log "launcher not ready"; false; }
  sleep 0.2
done

cat >"$BED_DIR/env" <<ENV
BED_KUBECONFIG=$kubeconfig
BED_AWS_ENDPOINT=http://127.0.0.1:$aws_port
BED_IMDS_MOCK=$imds_bin/ec2-metadata-mock
BED_KUBECTL=$kubernetes_bin/kubectl
BED_KUBERNETES_VERSION=$KUBERNETES_VERSION
ENV
bed_log "bed up in $((SECONDS - started)) s"
cat "$BED_DIR/env"
