#!/usr/bin/env bash
# Provision the control plane: etcd, the registry and the apiserver under systemd,
# started with shoal.bootstrap's commands (the same as `shoal lab`'s); then the demo
# images in the registry, and a join token for the workers in the shared folder.
#
#   env: SHOAL_CP_IP (the private network's address; required), SHOAL_SHARED_DIR
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

step "join token for the workers -> $SHOAL_SHARED_DIR/join.env"
bootstrap token --publish "$SHOAL_SHARED_DIR/join.env"
# (cp, not install -m: shared folders such as vboxsf may refuse chmod)
cp -v /var/lib/shoal/admin.conf "$SHOAL_SHARED_DIR/admin.conf"

step "checks (python -m shoal.bootstrap check)"
bootstrap check
