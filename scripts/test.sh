#!/usr/bin/env bash
# Install what the tests need and run every check and all three test tiers:
# lint (ruff), types (mypy --strict), layering (import-linter), then pytest
# (unit, integration, e2e; e2e needs root and is skipped with a reason without it).
# The mesh's e2e module needs a lab with meshagents: a second pass runs it on one
# (only when no pytest arguments narrow the run).
set -euo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "$0")/lib.sh"

install_packages etcd-server etcd-client ca-certificates shellcheck \
    containerd runc containernetworking-plugins busybox-static iproute2 iptables util-linux \
    docker-registry tcpdump
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
if [ "$#" -eq 0 ] && [ "$(id -u)" -eq 0 ]; then
    log "pytest: e2e with the mesh (a lab with --mesh)"
    SHOAL_E2E_MESH=1 pytest -q -p no:cacheprovider tests/e2e/test_orch_mesh.py
fi
