#!/usr/bin/env bash
# The main job: install what is needed, bring up a 3-node Shoal lab on this
# machine with `shoal lab up` (etcd, the apiserver and a registry on the host;
# each node in its own network namespace with its own containerd and node
# agent), run a demo app (a Deployment of busybox httpd pods behind a Service)
# and print what to try next. Remove everything with scripts/down.sh.
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
install_packages "${SHOAL_PACKAGES[@]}"
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

log "deploying the demo app: a Deployment of busybox httpd pods behind a Service (namespace $DEMO_NS)"
"$SHOAL" apply -f - <<YAML
apiVersion: v1
kind: Namespace
metadata:
  name: $DEMO_NS
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: $DEMO_NS
spec:
  replicas: $NODES
  selector:
    matchLabels: {app: web}
  strategy:
    rollingUpdate: {maxUnavailable: 0, maxSurge: 1}
  template:
    metadata:
      labels: {app: web}
    spec:
      containers:
      - name: httpd
        image: docker.io/library/busybox:1.36
        command: ["sh", "-c", "mkdir -p /www && echo hello from \$(hostname) > /www/index.html && exec httpd -f -p 8080 -h /www"]
        ports: [{name: http, containerPort: 8080}]
        readinessProbe: {httpGet: {path: /, port: 8080}, periodSeconds: 2}
---
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: $DEMO_NS
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: http}]
YAML

"$SHOAL" rollout status deployment/web -n "$DEMO_NS" --timeout 120s ||
    die "the demo app did not roll out; see: shoal describe deployment/web -n $DEMO_NS"
"$SHOAL" get pods,svc -n "$DEMO_NS" -o wide

CLUSTER_IP="$("$SHOAL" get svc web -n "$DEMO_NS" -o json | "$VENV/bin/python" -c 'import json, sys; print(json.load(sys.stdin)["spec"]["clusterIP"])')"
FIRST_POD="$("$SHOAL" get pods -n "$DEMO_NS" -l app=web -o name | head -n 1)"
FIRST_POD="${FIRST_POD#pod/}"

cat <<MSG

Shoal's lab is up: $NODES nodes, each running a web pod. Try:

  export SHOAL_CONFIG=$SHOAL_CONFIG PATH=$VENV/bin:\$PATH
  shoal get nodes -o wide
  shoal get deploy,pods,svc,endpoints -n $DEMO_NS -o wide
  shoal exec -n $DEMO_NS $FIRST_POD -- wget -q -O - http://$CLUSTER_IP/   # the Service, from a pod
  shoal logs -n $DEMO_NS $FIRST_POD
  shoal scale deployment/web -n $DEMO_NS --replicas=6
  shoal rollout restart deployment/web -n $DEMO_NS; shoal rollout status deployment/web -n $DEMO_NS
  shoal lab status
  shoal lab partition node-1 node-$NODES    # traffic between them drops; shoal lab heal
  shoal lab stop-node node-$NODES           # NotReady after 40 s; its pods move 300 s later

Logs: $LAB_DIR/logs/    Remove everything: sudo scripts/down.sh (--purge also deletes the data)
MSG
