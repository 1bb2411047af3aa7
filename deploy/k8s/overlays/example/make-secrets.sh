#!/usr/bin/env bash
# Throwaway credentials for the example overlay, written to secrets/ (git-ignored): a CA, a server
# certificate for splitwire-cloud's in-cluster names, and a random bearer token.
# For trying things out only. In production issue the certificate with cert-manager (its Secrets
# carry tls.crt, tls.key and ca.crt) or sync everything from an external secret store.
#
# Usage: ./make-secrets.sh [NAMESPACE [OUT_DIR]]   (defaults: splitwire, secrets/ beside this script)
# Needs openssl 1.1.1 or newer. Running it again replaces every file (and so rotates them).
set -euo pipefail

namespace="${1:-splitwire}"
out="${2:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/secrets}"
service=splitwire-cloud
days=90

mkdir -p "$out"
umask 077 # keys and token: owner only
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# The CA. Its key stays in $out/ca.key, outside the Secret: it signs edge client certificates if
# mutual TLS (tls_client_ca) is switched on.
openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$out/ca.key"
openssl req -x509 -new -key "$out/ca.key" -sha256 -days "$days" -subj "/CN=splitwire throwaway CA" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
  -out "$out/ca.crt"

# The server certificate. Edges check the name in their dns:/// target.
openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$out/tls.key"
openssl req -new -key "$out/tls.key" -subj "/CN=$service.$namespace.svc" -out "$work/tls.csr"
cat >"$work/extensions.cnf" <<EOF
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = DNS:$service, DNS:$service.$namespace.svc, DNS:$service.$namespace.svc.cluster.local, DNS:*.$service.$namespace.svc.cluster.local
EOF
openssl x509 -req -in "$work/tls.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" -sha256 -days "$days" \
  -set_serial "0x$(openssl rand -hex 16)" -extfile "$work/extensions.cnf" -out "$out/tls.crt"

# The bearer token: 32 random bytes, hex.
openssl rand -hex 32 >"$out/token"

chmod 644 "$out/ca.crt" "$out/tls.crt"
echo "wrote ca.crt, tls.crt, tls.key, token (and ca.key, not deployed) to $out for namespace $namespace"
