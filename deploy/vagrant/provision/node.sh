#!/usr/bin/env bash
# Provision a worker: Shoal installed as the README does, the node bootstrap
# (node-bootstrap.sh: spec, files, join with the token the control plane published
# in the shared folder), then containerd, the node agent and the mesh agent under
# systemd, started with shoal.bootstrap's commands (the same as `shoal lab`'s).
#
#   env: SHOAL_NODE_NAME, SHOAL_NODE_IP, SHOAL_API_SERVER, SHOAL_REGISTRY (see
#        node-bootstrap.sh), SHOAL_SHARED_DIR
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=deploy/vagrant/provision/common.sh
. "$HERE/common.sh"

install_shoal
kernel_settings

SHOAL_TOKEN_FILE="$SHOAL_SHARED_DIR/join.env" SHOAL_SPEC="$SHOAL_SPEC" \
    SHOAL_PYTHON="$SHOAL_PYTHON" "$HERE/node-bootstrap.sh"

install_units shoal-containerd.service shoal-nodeagent.service shoal-meshagent.service
start_units shoal-containerd.service shoal-nodeagent.service shoal-meshagent.service

step "checks (python -m shoal.bootstrap check)"
bootstrap check
