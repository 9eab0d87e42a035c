#!/usr/bin/env bash
# Stop what scripts/up.sh started (by the PIDs it recorded). Keeps the data;
# pass --purge to remove it too.
set -euo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "$0")/lib.sh"
STATE="${SHOAL_DEV_DIR:-$ROOT/.shoal-dev}"

stop_pid() {
    local name="$1" file="$STATE/$1.pid"
    [ -f "$file" ] || return 0
    local pid
    pid="$(cat "$file")"
    if kill -0 "$pid" 2>/dev/null; then
        log "stopping $name (pid $pid)"
        kill -TERM "$pid"
        for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
    fi
    rm -f "$file"
}

stop_pid apiserver
stop_pid etcd
if [ "${1:-}" = "--purge" ]; then
    log "removing $STATE"
    rm -rf "$STATE"
fi
