#!/usr/bin/env bash
# The main job: install what is needed, bring up a 3-node Shoal lab on this
# machine with `shoal lab up` (etcd, the apiserver and a registry on the host;
# each node in its own network namespace with its own containerd and node
# agent), run a demo app (a busybox httpd pod on every node) and print what to
# try next. Remove everything with scripts/down.sh.
#
#   sudo ./scripts/up.sh            # SHOAL_LAB_NODES=N and SHOAL_LAB_DIR=D change the defaults
set -euo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "$0")/lib.sh"

LAB_DIR="${SHOAL_LAB_DIR:-/var/lib/shoal/lab}"
NODES="${SHOAL_LAB_NODES:-3}"
DEMO_NS=demo

[ "$(id -u)" -eq 0 ] || die "run it as root: sudo $0 (the lab makes network namespaces, a bridge and iptables rules)"

had_registry=0
command -v docker-registry >/dev/null 2>&1 && had_registry=1
install_packages etcd-server etcd-client ca-certificates containerd runc \
    containernetworking-plugins busybox-static iproute2 iptables docker-registry \
    util-linux procps
# Installing docker-registry starts its service on :5000 where systemd runs; the
# lab runs its own registry there, so stop the one this script just installed.
if [ "$had_registry" -eq 0 ] && command -v systemctl >/dev/null 2>&1 &&
    systemctl is-active --quiet docker-registry 2>/dev/null; then
    log "stopping the docker-registry service the install started (the lab runs its own)"
    systemctl disable --now docker-registry
fi
make_venv ""
SHOAL="$VENV/bin/shoal"

"$SHOAL" lab up --nodes "$NODES" --dir "$LAB_DIR"
export SHOAL_CONFIG="$LAB_DIR/admin.conf"

log "deploying the demo app: a busybox httpd pod on each node (namespace $DEMO_NS)"
{
    printf 'apiVersion: v1\nkind: Namespace\nmetadata:\n  name: %s\n' "$DEMO_NS"
    for i in $(seq 1 "$NODES"); do
        cat <<YAML
---
apiVersion: v1
kind: Pod
metadata:
  name: web-node-$i
  namespace: $DEMO_NS
  labels: {app: web}
spec:
  nodeName: node-$i
  containers:
  - name: httpd
    image: docker.io/library/busybox:1.36
    command: ["sh", "-c", "mkdir -p /www && echo hello from node-$i > /www/index.html && exec httpd -f -p 8080 -h /www"]
    ports: [{containerPort: 8080}]
    readinessProbe: {httpGet: {path: /, port: 8080}, periodSeconds: 2}
YAML
    done
} | "$SHOAL" apply -f -

# Wait (bounded) until every demo pod runs; each poll asks the apiserver.
for _ in $(seq 1 120); do
    running="$("$SHOAL" get pods -n "$DEMO_NS" --no-headers | awk '$3 == "Running"' | wc -l)"
    [ "$running" -ge "$NODES" ] && break
    sleep 0.5
done
"$SHOAL" get pods -n "$DEMO_NS" -o wide
[ "$running" -ge "$NODES" ] || die "the demo pods did not all start; see: shoal describe pods -n $DEMO_NS"

ip_of() { "$SHOAL" get pod "$1" -n "$DEMO_NS" -o json | "$VENV/bin/python" -c 'import json, sys; print(json.load(sys.stdin)["status"]["podIP"])'; }
LAST="web-node-$NODES"
LAST_IP="$(ip_of "$LAST")"

cat <<MSG

Shoal's lab is up: $NODES nodes, each running a web pod. Try:

  export SHOAL_CONFIG=$SHOAL_CONFIG PATH=$VENV/bin:\$PATH
  shoal get nodes -o wide
  shoal get pods -n $DEMO_NS -o wide
  shoal exec -n $DEMO_NS web-node-1 -- wget -q -O - http://$LAST_IP:8080/   # pod to pod, across nodes
  shoal logs -n $DEMO_NS web-node-1
  shoal lab status
  shoal lab partition node-1 node-$NODES    # then the wget above times out; shoal lab heal
  shoal lab stop-node node-$NODES           # its Lease expires in 40 s; shoal lab start-node node-$NODES

Logs: $LAB_DIR/logs/    Remove everything: sudo scripts/down.sh (--purge also deletes the data)
MSG
