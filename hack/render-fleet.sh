#!/usr/bin/env bash
# Writes a large render input: MIRRORS RegistryMirrors (default 8) of UPSTREAMS upstreams each
# (default 125; the CRD admits at most 128), each with client auth, a TLS edge, cleanup and node
# config, plus the users Secret. docs/benchmarks.md times `mirrorfleet render -f` of it.
#   hack/render-fleet.sh [MIRRORS] [UPSTREAMS] > fleet.yaml
set -euo pipefail
mirrors="${1:-8}" upstreams="${2:-125}"
cat <<YAML
apiVersion: v1
kind: Secret
metadata: {name: users, namespace: bench}
stringData: {ci: ci-password, nodes: nodes-password}
YAML
for m in $(seq 0 $((mirrors - 1))); do
  cat <<YAML
---
apiVersion: mirrorfleet.io/v1alpha1
kind: RegistryMirror
metadata: {name: fleet$m, namespace: bench, uid: 6f1c1f2e-0000-4000-8000-00000000000$m}
spec:
  upstreams:
YAML
  for u in $(seq 0 $((upstreams - 1))); do
    echo "  - {name: u$u, registry: r$m-$u.example.com, remoteURL: \"https://r$m-$u.example.com\"}"
  done
  cat <<YAML
  clientAuth: {usersSecretRef: {name: users}, nodeUser: nodes}
  edge: {domain: m$m.mirror.example.com, tlsSecretRef: {name: tls}}
  cleanup: {schedule: "0 3 * * 0"}
  nodeConfig: {fallbackToUpstream: true}
YAML
done
