#!/usr/bin/env bash
# Provision the control plane: etcd, the registry and the apiserver under systemd,
# started with shoal.bootstrap's commands (the same as `shoal lab`'s); then the demo
# images in the registry, and a join token for the workers in the shared folder.
#
#   env: SHOAL_CP_IP (the private network's address; required), SHOAL_SHARED_DIR,
#        SHOAL_MESH_HOSTS ("NAME=IP ..."; the mesh-only hosts: each one's
#        WorkloadEntry, ServiceAccount and Service, applied here with admin.conf,
#        since a host may not name itself: see mesh-host.sh)
set -euo pipefail
# shellcheck source=deploy/vagrant/provision/common.sh
. "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/common.sh"
: "${SHOAL_CP_IP:?set SHOAL_CP_IP to the private address of the control plane}"

install_shoal
kernel_settings

step "bootstrap spec $SHOAL_SPEC (what this machine runs)"
mkdir -p "$(dirname "$SHOAL_SPEC")"
cat > "$SHOAL_SPEC.new" <<SPEC
# Written by deploy/vagrant/provision/control-plane.sh; read by python -m shoal.bootstrap
controlPlane:
  address: $SHOAL_CP_IP
  dataDir: /var/lib/shoal
  extraSans: [$(hostname)]
SPEC
mv -v "$SHOAL_SPEC.new" "$SHOAL_SPEC"
for component in etcd registry apiserver; do
    printf '    %-10s %s\n' "$component" "$(bootstrap show "$component")" >&2
done
bootstrap render

install_units shoal-etcd.service shoal-registry.service shoal-apiserver.service
start_units shoal-etcd.service shoal-registry.service shoal-apiserver.service

step "demo and pause images into the registry (nodes pull docker.io/* from it)"
bootstrap seed

for entry in ${SHOAL_MESH_HOSTS:-}; do
    mesh_host_name="${entry%%=*}"
    mesh_host_ip="${entry#*=}"
    manifest="/etc/shoal/$mesh_host_name.yaml"
    step "mesh-only host $mesh_host_name ($mesh_host_ip): its WorkloadEntry, ServiceAccount and Service ($manifest)"
    # The WorkloadEntry labelled shoal.dev/mesh-host is what lets that host's agent
    # get the certificate of serviceAccount $mesh_host_name (the node authorizer);
    # the Service's port is TCP (tcp-web): the L4 path, which the local lab's
    # mesh-only host e2e (tests/e2e/test_orch_mesh_hosts.py) exercises.
    cat > "$manifest.new" <<MANIFEST
# Written by deploy/vagrant/provision/control-plane.sh: the mesh-only host $mesh_host_name
apiVersion: v1
kind: ServiceAccount
metadata: {name: $mesh_host_name, namespace: default}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata:
  name: $mesh_host_name
  namespace: default
  labels: {shoal.dev/mesh-host: $mesh_host_name}
spec:
  address: $mesh_host_ip
  serviceAccount: $mesh_host_name
  labels: {app: $mesh_host_name}
  ports: {tcp-web: $SHOAL_MESH_HOST_PORT}
---
apiVersion: v1
kind: Service
metadata: {name: $mesh_host_name, namespace: default}
spec:
  selector: {app: $mesh_host_name}
  ports: [{name: tcp-web, port: 80, targetPort: $SHOAL_MESH_HOST_PORT}]
MANIFEST
    mv -v "$manifest.new" "$manifest"
    "$SHOAL_VENV/bin/shoal" --config /var/lib/shoal/admin.conf apply -f "$manifest"
done

step "join token for the workers -> $SHOAL_SHARED_DIR/join.env"
bootstrap token --publish "$SHOAL_SHARED_DIR/join.env"
# (cp, not install -m: shared folders such as vboxsf may refuse chmod)
cp -v /var/lib/shoal/admin.conf "$SHOAL_SHARED_DIR/admin.conf"

step "checks (python -m shoal.bootstrap check)"
bootstrap check
