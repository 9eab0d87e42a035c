#!/usr/bin/env bash
# The node bootstrap: write this node's spec, render its files (containerd's config
# and registry mirrors), and join the cluster with the token the control plane
# published. Starting the components is the supervisor's job (systemd in the VMs:
# node.sh; the e2e test starts the same ExecStart commands itself).
#
#   env (required): SHOAL_NODE_IP (the private network's address, never the NAT one),
#                   SHOAL_API_SERVER (HOST:PORT), SHOAL_TOKEN_FILE (join.env)
#   env (optional): SHOAL_NODE_NAME (hostname), SHOAL_REGISTRY (API host:5000),
#                   SHOAL_DATA_DIR (/var/lib/shoal/node), SHOAL_SPEC, SHOAL_PYTHON,
#                   SHOAL_MESH (1), SHOAL_LEASE_RENEW (10), SHOAL_WAIT (600 s),
#                   SHOAL_MESH_HOST (0; 1: a mesh-only host, which runs only the
#                   meshagent: the join is the same, as a one-off tool)
set -euo pipefail
: "${SHOAL_NODE_IP:?set SHOAL_NODE_IP to the private address of the node}"
: "${SHOAL_API_SERVER:?set SHOAL_API_SERVER to HOST:PORT of the apiserver}"
: "${SHOAL_TOKEN_FILE:?set SHOAL_TOKEN_FILE to the join.env the control plane published}"
NAME="${SHOAL_NODE_NAME:-$(hostname)}"
REGISTRY="${SHOAL_REGISTRY:-${SHOAL_API_SERVER%:*}:5000}"
DATA_DIR="${SHOAL_DATA_DIR:-/var/lib/shoal/node}"
SPEC="${SHOAL_SPEC:-/etc/shoal/bootstrap.yaml}"
PYTHON="${SHOAL_PYTHON:-/opt/shoal/venv/bin/python}"
MESH="$([ "${SHOAL_MESH:-1}" = 1 ] && echo true || echo false)"
WAIT="${SHOAL_WAIT:-600}"
MESH_HOST="$([ "${SHOAL_MESH_HOST:-0}" = 1 ] && echo true || echo false)"
[ "$MESH_HOST" = false ] || MESH=true

step() { printf '\n\033[1m==> [%s] %s\033[0m\n' "$NAME" "$*" >&2; }
bootstrap() { "$PYTHON" -P -m shoal.bootstrap --spec "$SPEC" "$@"; }

step "bootstrap spec $SPEC (what this node runs)"
mkdir -p "$(dirname "$SPEC")"
cat > "$SPEC.new" <<SPEC
# Written by deploy/vagrant/provision/node-bootstrap.sh; read by python -m shoal.bootstrap
node:
  name: $NAME
  ip: $SHOAL_NODE_IP
  dataDir: $DATA_DIR
  apiServer: $SHOAL_API_SERVER
  registry: $REGISTRY
  containerd: service
  mesh: $MESH
  leaseRenewInterval: ${SHOAL_LEASE_RENEW:-10}
  meshHost: $MESH_HOST
SPEC
mv "$SPEC.new" "$SPEC"
cat "$SPEC" >&2
for component in containerd nodeagent meshagent; do
    if { [ "$component" != meshagent ] && [ "$MESH_HOST" = false ]; } ||
        { [ "$component" = meshagent ] && [ "$MESH" = true ]; }; then
        printf '    %-10s %s\n' "$component" "$(bootstrap show "$component")" >&2
    fi
done

step "rendering this node's files"
bootstrap render

if [ -e "$DATA_DIR/node.conf" ]; then
    step "joining: $DATA_DIR/node.conf exists; the join only checks it"
else
    step "waiting for the control plane's join token in $SHOAL_TOKEN_FILE (up to ${WAIT}s)"
    waited=0
    until [ -s "$SHOAL_TOKEN_FILE" ]; do
        [ "$waited" -lt "$WAIT" ] || { echo "no join token in $SHOAL_TOKEN_FILE after ${WAIT}s; is the control plane provisioned?" >&2; exit 1; }
        [ $((waited % 15)) -ne 0 ] || echo "    still waiting for $SHOAL_TOKEN_FILE (${waited}s)" >&2
        sleep 1
        waited=$((waited + 1))
    done
fi

step "joining the cluster at $SHOAL_API_SERVER"
waited=0
until bootstrap join --token-file "$SHOAL_TOKEN_FILE"; do
    [ "$waited" -lt "$WAIT" ] || { echo "could not join in ${WAIT}s (the errors are above)" >&2; exit 1; }
    echo "    join failed (above); trying again in 5 s" >&2
    sleep 5
    waited=$((waited + 5))
done
