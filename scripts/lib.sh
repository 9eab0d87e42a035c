# Shared helpers for scripts/*.sh (sourced, not run).
# shellcheck shell=bash

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SHOAL_VENV:-$ROOT/.venv}"

# The Debian packages a Shoal machine needs (scripts/up.sh and the Vagrant VMs'
# provisioning, deploy/vagrant/provision/, install the same list).
# shellcheck disable=SC2034  # used by the scripts that source this file
SHOAL_PACKAGES=(etcd-server etcd-client ca-certificates containerd runc
    containernetworking-plugins busybox-static iproute2 iptables docker-registry
    util-linux procps libjs-d3)

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# install_packages PKG...: install the Debian packages that are missing.
install_packages() {
    local missing=()
    local p
    for p in "$@"; do
        # (dpkg-query's "no packages found" goes to grep, which finds no match in it)
        dpkg-query -W -f='${Status}' "$p" 2>&1 | grep -q "install ok installed" || missing+=("$p")
    done
    if [ "${#missing[@]}" -eq 0 ]; then
        return 0
    fi
    log "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    as_root dpkg --configure -a || true
    as_root apt-get update -q
    as_root apt-get install -y -q --no-install-recommends "${missing[@]}"
}

# pick_python: a Python >= 3.11 with venv support.
pick_python() {
    local py found
    for py in python3.13 python3.12 python3.11 python3; do
        found="$(command -v "$py")" || continue
        if "$found" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)'; then
            echo "$found"
            return 0
        fi
    done
    return 1
}

# make_venv EXTRAS: create .venv (if missing) and install Shoal into it, editable.
make_venv() {
    local extras="$1"
    local py
    py="$(pick_python)" || die "Python 3.11 or newer is needed (Debian 12: apt-get install python3)"
    if [ ! -x "$VENV/bin/python" ]; then
        if ! "$py" -m venv "$VENV"; then
            log "no venv module (the error above); installing python3-venv"
            install_packages python3-venv
            "$py" -m venv "$VENV"
        fi
    fi
    log "installing Shoal into $VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q -e "$ROOT$extras"
}
