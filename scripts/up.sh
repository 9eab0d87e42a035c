#!/usr/bin/env bash
# The main job: install what is needed, start etcd and the apiserver on this
# machine, and show the cluster's namespaces. Stop everything with scripts/down.sh.
set -euo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "$0")/lib.sh"

STATE="${SHOAL_DEV_DIR:-$ROOT/.shoal-dev}"
ETCD_PORT="${SHOAL_ETCD_PORT:-2379}"
API_PORT="${SHOAL_API_PORT:-6443}"
METRICS_PORT="${SHOAL_METRICS_PORT:-9090}"

install_packages etcd-server etcd-client ca-certificates
make_venv ""
mkdir -p "$STATE"

running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

if running "$STATE/etcd.pid"; then
    log "etcd already running (pid $(cat "$STATE/etcd.pid"))"
else
    log "starting etcd on 127.0.0.1:$ETCD_PORT (data in $STATE/etcd)"
    etcd --name shoal-dev --data-dir "$STATE/etcd" \
        --listen-client-urls "http://127.0.0.1:$ETCD_PORT" \
        --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
        --listen-peer-urls "http://127.0.0.1:$((ETCD_PORT + 1))" \
        --initial-advertise-peer-urls "http://127.0.0.1:$((ETCD_PORT + 1))" \
        --initial-cluster "shoal-dev=http://127.0.0.1:$((ETCD_PORT + 1))" \
        --logger zap --log-level warn >>"$STATE/etcd.log" 2>&1 &
    echo $! >"$STATE/etcd.pid"
    for _ in $(seq 1 100); do
        if ETCDCTL_API=3 etcdctl --endpoints "127.0.0.1:$ETCD_PORT" endpoint health >/dev/null 2>&1; then
            break
        fi
        running "$STATE/etcd.pid" || die "etcd exited; see $STATE/etcd.log"
        sleep 0.1
    done
fi

"$VENV/bin/shoal-apiserver" init --data-dir "$STATE" --server-address "127.0.0.1:$API_PORT"

if running "$STATE/apiserver.pid"; then
    log "apiserver already running (pid $(cat "$STATE/apiserver.pid"))"
else
    log "starting the apiserver on 127.0.0.1:$API_PORT (TLS), metrics on :$METRICS_PORT"
    "$VENV/bin/shoal-apiserver" serve --data-dir "$STATE" --storage etcd \
        --etcd-servers "127.0.0.1:$ETCD_PORT" --listen "127.0.0.1:$API_PORT" \
        --metrics-listen "127.0.0.1:$METRICS_PORT" >>"$STATE/apiserver.log" 2>&1 &
    echo $! >"$STATE/apiserver.pid"
fi
for _ in $(seq 1 150); do
    if "$VENV/bin/python" - "$METRICS_PORT" <<'PY' 2>/dev/null; then break; fi
import sys, urllib.request
urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/readyz", timeout=1).read()
PY
    running "$STATE/apiserver.pid" || die "the apiserver exited; see $STATE/apiserver.log"
    sleep 0.1
done

export SHOAL_CONFIG="$STATE/admin.conf"
log "shoal get namespaces"
"$VENV/bin/shoal" get namespaces

cat <<MSG

Shoal's control plane is up (etcd + apiserver). Try:

  export SHOAL_CONFIG=$STATE/admin.conf PATH=$VENV/bin:\$PATH
  shoal apply -f examples/hello.yaml
  shoal get configmaps,deployments -A
  shoal get deployments -w          # watch; Ctrl-C to stop
  curl -s 127.0.0.1:$METRICS_PORT/metrics | grep shoal_apiserver_request_total

Logs: $STATE/*.log    Stop: scripts/down.sh
MSG
