#!/usr/bin/env bash
# Makes a development CA and a webhook serving certificate signed by it, for the test bed (the API
# server calls https://127.0.0.1:<port>) and for kind (the in-cluster Service names). Private keys stay
# in the output directory, which git ignores; never commit them.
#
#   certs/make-dev-certs.sh [OUT_DIR]          # default certs/out
#   certs/make-dev-certs.sh --renew [OUT_DIR]  # a new serving certificate from the existing CA
#
# Writes ca.crt, ca.key, tls.crt, tls.key. Use tls.crt/tls.key with
# `spot-rebalancer webhook --tls-cert-file … --tls-key-file …`, and base64 of ca.crt as the webhook
# configurations' caBundle (or create the Secret: kubectl -n spot-rebalancer create secret tls
# spot-rebalancer-webhook-tls --cert OUT/tls.crt --key OUT/tls.key).
set -euo pipefail

renew=false
if [[ ${1:-} == --renew ]]; then
  renew=true
  shift
fi
out=${1:-"$(dirname "${BASH_SOURCE[0]}")/out"}
mkdir -p "$out"
umask 077

service=spot-rebalancer-webhook
namespace=spot-rebalancer

if [[ $renew == false || ! -f $out/ca.key ]]; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 3650 \
    -subj "/CN=spot-rebalancer development CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -keyout "$out/ca.key" -out "$out/ca.crt" 2>/dev/null
fi

sans="DNS:localhost,IP:127.0.0.1,DNS:$service,DNS:$service.$namespace,DNS:$service.$namespace.svc"
sans+=",DNS:$service.$namespace.svc.cluster.local"
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$service.$namespace.svc" \
  -keyout "$out/tls.key.new" -out "$out/tls.csr" 2>/dev/null
openssl x509 -req -in "$out/tls.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" -CAcreateserial -days 90 \
  -extfile <(printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth\nkeyUsage=critical,digitalSignature\n' "$sans") \
  -out "$out/tls.crt.new" 2>/dev/null
# Key first, then certificate, each renamed into place: a reader sees an old or a new file, never half.
mv "$out/tls.key.new" "$out/tls.key"
mv "$out/tls.crt.new" "$out/tls.crt"
rm -f "$out/tls.csr" "$out/ca.srl"
chmod 644 "$out/ca.crt" "$out/tls.crt"

echo "CA:          $out/ca.crt"
echo "certificate: $out/tls.crt (SAN $sans)"
echo "key:         $out/tls.key"
