#!/usr/bin/env bash
# Install what the tests need and run every check and all three test tiers:
# lint (ruff), types (mypy --strict), layering (import-linter), then pytest
# (unit, integration, e2e; e2e needs root and is skipped with a reason without it).
set -euo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "$0")/lib.sh"

install_packages etcd-server etcd-client ca-certificates shellcheck \
    containerd runc containernetworking-plugins busybox-static iproute2 iptables util-linux \
    docker-registry
make_venv "[dev]"
cd "$ROOT"
export PATH="$VENV/bin:$PATH"

log "shellcheck"
shellcheck scripts/*.sh .ci/run
log "ruff"
ruff check .
log "mypy --strict"
mypy
log "generated code is current"
python tools/genproto.py --check
log "import-linter (layering)"
lint-imports
log "pytest: unit, integration, e2e"
pytest -q -p no:cacheprovider --durations=15 "$@"
