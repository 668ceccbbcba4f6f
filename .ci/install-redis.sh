#!/usr/bin/env bash
# Install a real Redis for the shared-state tests (tests/integration/test_shared_redis.py): Debian's `redis-server`
# package, nothing downloaded by hand. Idempotent: does nothing when `redis-server` is already on PATH.
#
# The tests start their own redis-server (loopback port, temporary directory, no persistence), so the
# Debian service must not run: while the package installs, a policy-rc.d that denies every service start
# is in place (Docker images ship one already; we add ours only if there is none, and remove it again).
# Should a service have started anyway (a machine with a real init), it is stopped through the init system.
set -euo pipefail

if command -v redis-server >/dev/null 2>&1; then
    echo "install-redis: $(command -v redis-server) already installed"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi

POLICY=/usr/sbin/policy-rc.d
ADDED_POLICY=0
if [ ! -e "$POLICY" ]; then
    printf '#!/bin/sh\n# added by hedge .ci/install-redis.sh while installing\nexit 101\n' \
        | $SUDO tee "$POLICY" >/dev/null
    $SUDO chmod 755 "$POLICY"
    ADDED_POLICY=1
fi
cleanup() {
    if [ "$ADDED_POLICY" -eq 1 ]; then
        $SUDO rm -f "$POLICY"
    fi
}
trap cleanup EXIT

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends redis-server

# Belt and braces: if the package's service came up anyway, stop it (and keep it from starting on boot).
if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
    $SUDO systemctl disable --now redis-server.service >/dev/null 2>&1 || true
elif [ -x /etc/init.d/redis-server ]; then
    $SUDO /etc/init.d/redis-server stop >/dev/null 2>&1 || true
fi

command -v redis-server >/dev/null 2>&1 || { echo "install-redis: redis-server not on PATH" >&2; exit 1; }
echo "install-redis: installed $(redis-server --version 2>&1 | head -n 1)"
