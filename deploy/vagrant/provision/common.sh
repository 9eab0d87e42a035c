# Shared steps of the VMs' provisioning (sourced by control-plane.sh and node.sh).
# shellcheck shell=bash
#
# Every step says what it does (==> lines, and the commands' own output); nothing
# is thrown away. Every step converges: running the provisioning again
# (`vagrant provision`) changes only what differs.

SHOAL_SHARED_SRC="${SHOAL_SHARED_SRC:-/vagrant}"           # the repository, shared by Vagrant
SHOAL_SRC="${SHOAL_SRC:-/opt/shoal/src}"                   # our copy: works before /vagrant is mounted
export SHOAL_VENV="${SHOAL_VENV:-/opt/shoal/venv}"          # lib.sh's make_venv installs here
SHOAL_PYTHON="$SHOAL_VENV/bin/python"
SHOAL_SPEC="${SHOAL_SPEC:-/etc/shoal/bootstrap.yaml}"
# Where the control plane publishes the join token (and admin.conf) for the others.
SHOAL_SHARED_DIR="${SHOAL_SHARED_DIR:-$SHOAL_SHARED_SRC/deploy/vagrant/.shared}"
# A mesh-only host's demo process listens on its address on this port.
SHOAL_MESH_HOST_PORT="${SHOAL_MESH_HOST_PORT:-8080}"

step() { printf '\n\033[1m==> [%s] %s\033[0m\n' "$(hostname)" "$*" >&2; }

# install_shoal: the README's Debian packages (scripts/lib.sh SHOAL_PACKAGES, as
# scripts/up.sh) and Shoal itself; install_shoal_with PACKAGE...: the same with only
# those packages (a mesh-only host: no containerd, etcd or registry).
install_shoal() {
    # shellcheck source=scripts/lib.sh
    . "$SHOAL_SHARED_SRC/scripts/lib.sh"
    install_shoal_with "${SHOAL_PACKAGES[@]}"
}

# install_shoal_with PACKAGE...: those Debian packages besides Python, rsync and
# kmod, then Shoal (scripts/lib.sh's install_packages and make_venv, as
# scripts/up.sh uses them), from a copy of the shared repository, so the units
# start at boot before /vagrant is mounted.
install_shoal_with() {
    # shellcheck source=scripts/lib.sh
    . "$SHOAL_SHARED_SRC/scripts/lib.sh"
    step "Debian packages: $* python3 python3-venv rsync kmod"
    install_packages "$@" python3 python3-venv rsync kmod
    step "copying the Shoal source $SHOAL_SHARED_SRC -> $SHOAL_SRC"
    mkdir -p "$SHOAL_SRC"
    rsync -a --delete --itemize-changes \
        --exclude .git/ --exclude .venv/ --exclude '*.egg-info/' --exclude __pycache__/ \
        --exclude .mypy_cache/ --exclude .ruff_cache/ --exclude .pytest_cache/ \
        --exclude deploy/vagrant/.vagrant/ --exclude deploy/vagrant/.shared/ \
        "$SHOAL_SHARED_SRC/" "$SHOAL_SRC/"
    # From here on lib.sh's ROOT is the copy.
    # shellcheck source=scripts/lib.sh
    . "$SHOAL_SRC/scripts/lib.sh"
    step "Shoal into $SHOAL_VENV (make_venv, as scripts/up.sh)"
    make_venv ""
    # Debian's packages start their own etcd, registry and containerd; ours take
    # their ports (and say Conflicts=), so theirs go, on every machine.
    replace_debian_services etcd.service docker-registry.service containerd.service
}

# kernel_settings: what pods, the service proxy and containerd need, now and at boot.
kernel_settings() {
    step "kernel modules and sysctls (/etc/modules-load.d/shoal.conf, /etc/sysctl.d/90-shoal.conf)"
    printf '%s\n' overlay br_netfilter > /etc/modules-load.d/shoal.conf
    modprobe -v overlay
    modprobe -v br_netfilter
    cat > /etc/sysctl.d/90-shoal.conf <<'SYSCTL'
# Shoal: nodes route pod traffic; bridged pod traffic goes through iptables (Services).
net.ipv4.ip_forward = 1
net.bridge.bridge-nf-call-iptables = 1
fs.inotify.max_user_instances = 512
fs.inotify.max_user_watches = 65536
SYSCTL
    sysctl -p /etc/sysctl.d/90-shoal.conf
}

# replace_debian_services UNIT...: Debian's packages start their own etcd, registry
# and containerd; ours take their ports (and say Conflicts=), so theirs go.
replace_debian_services() {
    local unit
    for unit in "$@"; do
        if [ -e "/lib/systemd/system/$unit" ] && [ "$(systemctl is-enabled "$unit")" != masked ]; then
            step "disabling Debian's $unit (Shoal runs its own)"
            systemctl disable --now "$unit"
        fi
    done
}

# install_units UNIT...: our units from deploy/systemd, then a daemon-reload.
install_units() {
    local unit
    step "systemd units: $*"
    for unit in "$@"; do
        install -v -m 0644 "$SHOAL_SRC/deploy/systemd/$unit" "/etc/systemd/system/$unit"
    done
    systemctl daemon-reload
}

# start_units UNIT...: enabled (so they come back after a reboot or `vagrant halt`)
# and started if they are not running; a Type=notify unit's start returns once it
# says READY=1. (After changing Shoal's code: systemctl restart 'shoal-*'.)
start_units() {
    step "enabling and starting: $*"
    systemctl enable --now "$@"
    systemctl --no-pager --lines=0 status "$@"
}

bootstrap() { "$SHOAL_PYTHON" -P -m shoal.bootstrap --spec "$SHOAL_SPEC" "$@"; }
