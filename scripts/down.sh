#!/usr/bin/env bash
# Remove the lab scripts/up.sh brought up (`shoal lab down`): processes,
# namespaces, interfaces, iptables rules and mounts. Keeps its data and logs;
# pass --purge to remove them too. Also stops a control plane that an older
# up.sh started under .shoal-dev (by the PIDs it recorded).
set -euo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "$0")/lib.sh"
LAB_DIR="${SHOAL_LAB_DIR:-/var/lib/shoal/lab}"
LEGACY="${SHOAL_DEV_DIR:-$ROOT/.shoal-dev}"
PURGE=()
if [ "${1:-}" = "--purge" ]; then PURGE=(--purge); fi

if [ -x "$VENV/bin/shoal" ]; then
    "$VENV/bin/shoal" lab down --dir "$LAB_DIR" "${PURGE[@]}"
elif [ -e "$LAB_DIR/state.json" ]; then
    die "no $VENV/bin/shoal to take down the lab in $LAB_DIR; run scripts/up.sh's make_venv first"
fi

stop_pid() {
    local name="$1" file="$LEGACY/$1.pid"
    [ -f "$file" ] || return 0
    local pid
    pid="$(cat "$file")"
    if kill -0 "$pid" 2>/dev/null; then
        log "stopping the old $name (pid $pid)"
        kill -TERM "$pid"
        for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
    fi
    rm -f "$file"
}

stop_pid apiserver
stop_pid etcd
if [ "${#PURGE[@]}" -gt 0 ] && [ -d "$LEGACY" ]; then
    log "removing $LEGACY"
    rm -rf "$LEGACY"
fi
