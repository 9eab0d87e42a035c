#!/usr/bin/env bash
# Provision a mesh-only host: a VM outside the cluster whose plain process joins the
# mesh (docs/ARCHITECTURE.md "The mesh beyond the cluster"; the local lab's
# `shoal lab meshhost add` is the same in a network namespace). It runs:
#   - no node agent, no containerd, no pods, no Node object;
#   - the node bootstrap's join, as a one-off tool (node-bootstrap.sh with
#     SHOAL_MESH_HOST=1: `shoal-nodeagent join` with the control plane's published
#     token): its identity CN=system:node:NAME, O=system:nodes in node.conf, its
#     key made here and never sent;
#   - shoal-meshhost-routes (oneshot, `python -m shoal.bootstrap routes`): routes
#     to each node's pod CIDR through that node and to the service CIDR;
#   - shoal-meshagent (the same unit as the workers'; the spec's meshHost: true
#     makes its command `shoal-meshagent run --mesh-host --capture`);
#   - shoal-meshhost-demo: python3 -m http.server on NODE_IP:$SHOAL_MESH_HOST_PORT
#     as a DynamicUser of its own (the capture leaves only the agent's own user alone).
# The WorkloadEntry labelled shoal.dev/mesh-host: NAME, which lets this host's
# agent get that workload's certificate, is applied by the control plane's
# provisioning (control-plane.sh, SHOAL_MESH_HOSTS): writing one is not a node
# right, so the host cannot name itself.
#
#   env: SHOAL_NODE_NAME, SHOAL_NODE_IP, SHOAL_API_SERVER (see node-bootstrap.sh),
#        SHOAL_SHARED_DIR, SHOAL_MESH_HOST_PORT (8080)
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=deploy/vagrant/provision/common.sh
. "$HERE/common.sh"
: "${SHOAL_NODE_IP:?set SHOAL_NODE_IP to the private address of the mesh-only host}"
NAME="${SHOAL_NODE_NAME:-$(hostname)}"

# What the mesh agent and the routes need, and nothing that runs containers.
install_shoal_with ca-certificates iproute2 iptables util-linux procps

SHOAL_TOKEN_FILE="$SHOAL_SHARED_DIR/join.env" SHOAL_SPEC="$SHOAL_SPEC" \
    SHOAL_PYTHON="$SHOAL_PYTHON" SHOAL_MESH_HOST=1 "$HERE/node-bootstrap.sh"

step "the demo workload: /srv/shoal-demo, /etc/shoal/meshhost-demo.env"
mkdir -p /srv/shoal-demo
printf 'hello from %s\n' "$NAME" > /srv/shoal-demo/index.html
printf 'SHOAL_DEMO_ADDRESS=%s\nSHOAL_DEMO_PORT=%s\n' "$SHOAL_NODE_IP" "$SHOAL_MESH_HOST_PORT" \
    > /etc/shoal/meshhost-demo.env
cat /etc/shoal/meshhost-demo.env >&2

install_units shoal-meshhost-routes.service shoal-meshagent.service shoal-meshhost-demo.service
# The routes are re-read from the Nodes on every run (a worker that joined later).
step "routes to the pods and Services (python -m shoal.bootstrap routes)"
systemctl enable shoal-meshhost-routes.service
systemctl restart shoal-meshhost-routes.service
ip route show >&2
start_units shoal-meshagent.service shoal-meshhost-demo.service

step "checks (python -m shoal.bootstrap check)"
bootstrap check
