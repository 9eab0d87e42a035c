#!/usr/bin/env bash
# Install what the tests need and run every check and all three test tiers:
# lint (ruff), types (mypy --strict), layering (import-linter), then pytest
# (unit, integration, e2e; e2e needs root and is skipped with a reason without it).
# The mesh's e2e module needs a lab with meshagents: a second pass runs it on one
# (only when no pytest arguments narrow the run). A third pass runs the chaos
# suite (tests/chaos, issue 10) on a lab of its own, after the others' labs are
# down; SHOAL_CHAOS_LONG=1 runs its longer variants.
set -euo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "$0")/lib.sh"

install_packages etcd-server etcd-client ca-certificates shellcheck \
    containerd runc containernetworking-plugins busybox-static iproute2 iptables util-linux \
    docker-registry tcpdump kmod vagrant systemd \
    libjs-d3 chromium chromium-driver
make_venv "[dev]"
cd "$ROOT"
export PATH="$VENV/bin:$PATH"

# verify_units: systemd-analyze verify on deploy/systemd's units, failing on any
# complaint (it exits 0 on unknown keys). It also needs each ExecStart binary to
# exist: the units name /opt/shoal/venv (where the VMs install Shoal), so copies
# naming this checkout's venv are checked; nothing else is changed.
verify_units() {
    if ! command -v systemd-analyze >/dev/null; then
        log "systemd-analyze is not installed: units not verified"
        return 0
    fi
    local tmp out unit
    tmp="$(mktemp -d)"
    for unit in deploy/systemd/*.service; do
        sed "s#/opt/shoal/venv/#$VENV/#g" "$unit" > "$tmp/${unit##*/}"
    done
    out="$(systemd-analyze verify "$tmp"/*.service 2>&1)" || true
    rm -r "$tmp"
    if [ -n "$out" ]; then
        printf '%s\n' "$out" >&2
        die "systemd-analyze verify: fix the units above (deploy/systemd)"
    fi
}

log "shellcheck"
shopt -s globstar
shellcheck -x scripts/*.sh .ci/run deploy/**/*.sh
log "vagrant validate (deploy/vagrant; --ignore-provider: no VM provider runs here)"
# Without a usable provider `vagrant validate` stops at "No usable default provider";
# --ignore-provider checks everything but the virtualbox/libvirt blocks, offline.
# The default shared folder (NFS) makes validate look for an NFS server on this
# machine, which CI has none of, and virtiofs needs the vagrant-libvirt plugin:
# validated with VirtualBox's own shared folders instead.
(cd deploy/vagrant &&
    SHOAL_SYNC=virtualbox VAGRANT_CHECKPOINT_DISABLE=1 vagrant validate --ignore-provider)
log "systemd-analyze verify (deploy/systemd)"
verify_units
log "ruff"
ruff check .
log "mypy --strict"
mypy
log "generated code is current"
python tools/genproto.py --check
log "import-linter (layering)"
lint-imports
if [ "$(id -u)" -eq 0 ]; then
    # NetworkPolicy filters traffic bridged between pods of one node through
    # br_netfilter; loaded before the lab comes up so the lab sees it too.
    # (/proc/sys/net/bridge appears once it is there, built in or loaded.)
    if [ ! -e /proc/sys/net/bridge ]; then
        modprobe br_netfilter ||
            log "br_netfilter not loaded: same-node NetworkPolicy e2e will fail"
    fi
fi
log "pytest: unit, integration, e2e"
pytest -q -p no:cacheprovider --durations=15 "$@"
if [ "$#" -eq 0 ] && [ "$(id -u)" -eq 0 ]; then
    log "pytest: e2e with the mesh (a lab with --mesh)"
    SHOAL_E2E_MESH=1 pytest -q -p no:cacheprovider tests/e2e/test_orch_mesh.py \
        tests/e2e/test_orch_mesh_optin.py \
        tests/e2e/test_orch_mesh_hosts.py \
        tests/e2e/test_orch_mesh_gateway.py \
        tests/e2e/test_orch_mesh_upstream.py \
        tests/e2e/test_orch_mesh_l7.py \
        tests/e2e/test_orch_mesh_telemetry.py \
        tests/e2e/test_orch_hpa_mesh.py \
        tests/e2e/test_orch_dashboard.py \
        tests/e2e/test_orch_netpol.py
    log "pytest: chaos suite (its own lab: 3 control-plane members, 2 nodes, mesh)"
    pytest -q -p no:cacheprovider tests/chaos
fi
