#!/usr/bin/env bash
# Installs the Debian packages the tests drive, only when something is missing:
# swaks (with the Perl modules it needs for TLS, IPv6 and AUTH), openssl,
# postfix for its smtp-sink and smtp-source tools, and haproxy (run by the tests
# in the foreground to send PROXY protocol headers), and util-linux-extra for
# fincore (which pages of a file are cached), and strace (the durability tests
# read the order of the server's syncs and replies from it), and systemd for
# systemd-analyze (the tests verify contrib/ehlo.service; installing the
# package starts nothing where systemd is not running), and dovecot-core with
# dovecot-lmtpd (a real LMTP server the tests run in the foreground with a
# configuration of their own), and chromium with chromium-driver (the web
# page's tests drive a headless browser through selenium), and postgresql
# (the tests run throwaway clusters with initdb and pg_ctl in a temporary
# folder). Postfix is installed with "No configuration" and is never left
# running: no mail daemon on port 25; nor are haproxy, dovecot and
# postgresql left running as services.
set -euo pipefail

# Debian packages; usable() below also checks the commands they must provide.
PACKAGES=(swaks openssl postfix haproxy util-linux-extra strace libnet-ssleay-perl libio-socket-inet6-perl
    libauthen-sasl-perl systemd dovecot-core dovecot-lmtpd chromium chromium-driver postgresql)
export PATH="$PATH:/usr/sbin:/sbin"

log() { echo "install-test-deps: $*" >&2; }

installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'
}

usable() {
    case "$1" in
        swaks | openssl) command -v "$1" >/dev/null 2>&1 ;;
        postfix) command -v smtp-sink >/dev/null 2>&1 && command -v smtp-source >/dev/null 2>&1 ;;
        haproxy) command -v haproxy >/dev/null 2>&1 ;;
        util-linux-extra) command -v fincore >/dev/null 2>&1 ;;
        strace) command -v strace >/dev/null 2>&1 ;;
        systemd) command -v systemd-analyze >/dev/null 2>&1 ;;
        dovecot-core) command -v dovecot >/dev/null 2>&1 ;;
        dovecot-lmtpd) [ -x /usr/lib/dovecot/lmtp ] ;;
        chromium) command -v chromium >/dev/null 2>&1 ;;
        chromium-driver) command -v chromedriver >/dev/null 2>&1 ;;
        postgresql) compgen -G '/usr/lib/postgresql/*/bin/pg_ctl' >/dev/null ;;
        *) true ;;
    esac
}

port25_listening() {
    # State 0A is LISTEN; port 25 is 0019 in /proc/net/tcp{,6}.
    awk 'NR > 1 && $4 == "0A" && $2 ~ /:0019$/ { found = 1 } END { exit !found }' \
        /proc/net/tcp /proc/net/tcp6 2>/dev/null
}

missing=()
for pkg in "${PACKAGES[@]}"; do
    if ! installed "$pkg" || ! usable "$pkg"; then
        missing+=("$pkg")
    fi
done

if [ "${#missing[@]}" -eq 0 ]; then
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    log "missing ${missing[*]}, and this is not a Debian system (no apt-get); install them by hand"
    exit 1
fi

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO=(sudo)
    else
        log "missing ${missing[*]}; run as root or install sudo"
        exit 1
    fi
fi

postfix_was_installed=false
installed postfix && postfix_was_installed=true
haproxy_was_installed=false
installed haproxy && haproxy_was_installed=true
dovecot_was_installed=false
installed dovecot-core && dovecot_was_installed=true
postgresql_was_installed=false
installed postgresql && postgresql_was_installed=true

# Keep package scripts from starting daemons while we install (Debian's
# policy-rc.d convention, honoured by invoke-rc.d and deb-systemd-invoke).
policy=/usr/sbin/policy-rc.d
own_policy=false
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\n# written by install-test-deps.sh for the duration of an install\nexit 101\n' \
        | "${SUDO[@]}" tee "$policy" >/dev/null
    "${SUDO[@]}" chmod 755 "$policy"
    own_policy=true
fi
cleanup() {
    if [ "$own_policy" = true ]; then
        "${SUDO[@]}" rm -f "$policy"
    fi
}
trap cleanup EXIT

log "installing ${missing[*]}"
echo "postfix postfix/main_mailer_type select No configuration" \
    | "${SUDO[@]}" debconf-set-selections
echo "postfix postfix/mailname string localhost" | "${SUDO[@]}" debconf-set-selections

apt=(env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=120 -q)
"${SUDO[@]}" "${apt[@]}" update || log "apt-get update failed; trying with the lists we have"
"${SUDO[@]}" "${apt[@]}" install -y --no-install-recommends "${missing[@]}"

# Stop a service the package just started, and keep it from starting at boot.
disable_service() {
    if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
        "${SUDO[@]}" systemctl disable --now "$1.service" >/dev/null 2>&1 || true
    elif command -v service >/dev/null 2>&1; then
        "${SUDO[@]}" service "$1" stop >/dev/null 2>&1 || true
    fi
    if command -v update-rc.d >/dev/null 2>&1; then
        "${SUDO[@]}" update-rc.d "$1" disable >/dev/null 2>&1 || true
    fi
}

# Postfix is only a toolbox here: make sure it does not run (nor start at boot).
if [ "$postfix_was_installed" = false ] && installed postfix; then
    if "${SUDO[@]}" postfix status >/dev/null 2>&1; then
        "${SUDO[@]}" postfix stop >/dev/null 2>&1 || true
    fi
    disable_service postfix
fi

# HAProxy too: the tests start their own in the foreground; no service.
if [ "$haproxy_was_installed" = false ] && installed haproxy; then
    disable_service haproxy
fi

# Dovecot as well: the tests run `dovecot -c FILE -F` with their own configuration.
if [ "$dovecot_was_installed" = false ] && installed dovecot-core; then
    disable_service dovecot
fi

# PostgreSQL too: the tests start their own clusters as an unprivileged user.
if [ "$postgresql_was_installed" = false ] && installed postgresql; then
    disable_service postgresql
fi

for pkg in "${PACKAGES[@]}"; do
    if ! installed "$pkg" || ! usable "$pkg"; then
        log "$pkg is still missing after the install"
        exit 1
    fi
done
if port25_listening; then
    log "warning: something listens on port 25; the tests do not need it"
fi
log "done: swaks, openssl, smtp-sink, smtp-source, haproxy, fincore, strace, systemd-analyze and dovecot (LMTP) are installed"
