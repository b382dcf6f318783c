#!/usr/bin/env bash
# Installs what `make bench` needs besides the project venv, only when it is
# missing (quick when everything is there):
#   - Postfix's smtp-source and smtp-sink (scripts/install-test-deps.sh);
#   - bench/.venv-aiosmtpd: aiosmtpd and uvloop, pinned, for bench/aiosmtpd_server.py;
#   - bench/node/node_modules: nodemailer's smtp-server, from package-lock.json (npm ci).
# Nothing here touches the project venv (.venv).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
PYTHON="${PYTHON:-python3}"
AIOSMTPD_REQUIREMENTS=(aiosmtpd==1.4.6 uvloop==0.23.0)

log() { echo "bench/setup: $*" >&2; }

# 1. smtp-source / smtp-sink (and the other test tools) from Debian.
bash "$ROOT/scripts/install-test-deps.sh"

# 2. The aiosmtpd venv. A stamp records the venv's path and the pinned
#    requirements: a moved venv or a changed pin is rebuilt.
venv="$HERE/.venv-aiosmtpd"
stamp="$venv/.bench-installed"
want="$venv ${AIOSMTPD_REQUIREMENTS[*]}"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] \
    || ! "$venv/bin/python" -c 'import aiosmtpd, uvloop' 2>/dev/null; then
    log "creating $venv (${AIOSMTPD_REQUIREMENTS[*]})"
    rm -rf "$venv"
    "$PYTHON" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
        "${AIOSMTPD_REQUIREMENTS[@]}"
    echo "$want" > "$stamp"
fi

# 3. Node.js smtp-server. Node.js 20 or newer is needed (smtp-server's engines).
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    log "node or npm is missing: installing Debian's nodejs and npm"
    apt=(env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=120 -q)
    SUDO=()
    [ "$(id -u)" -ne 0 ] && SUDO=(sudo)
    "${SUDO[@]}" "${apt[@]}" update || true
    "${SUDO[@]}" "${apt[@]}" install -y --no-install-recommends nodejs npm
fi
major="$(node -p 'process.versions.node.split(".")[0]')"
if [ "$major" -lt 20 ]; then
    log "warning: node $(node --version) is older than smtp-server's minimum (20); the node server may fail"
fi
node_dir="$HERE/node"
node_stamp="$node_dir/node_modules/.bench-installed"
lock_sum="$(sha256sum "$node_dir/package-lock.json" | cut -d' ' -f1)"
if [ "$(cat "$node_stamp" 2>/dev/null)" != "$lock_sum" ] \
    || [ ! -f "$node_dir/node_modules/smtp-server/package.json" ]; then
    log "npm ci in $node_dir"
    (cd "$node_dir" && npm ci --no-audit --no-fund --loglevel=error)
    echo "$lock_sum" > "$node_stamp"
fi
