#!/usr/bin/env bash
# Install a real Prometheus for tests/system/test_dashboard.py: Debian's `prometheus` package, nothing downloaded
# by hand. Idempotent: does nothing when a `prometheus` binary is already on PATH.
#
# The test starts its own Prometheus (temporary config, storage and port), so the Debian service must not
# run: while the package installs, a policy-rc.d that denies every service start is in place (Docker
# images ship one already; we add ours only if there is none, and remove it again). Should a service have
# started anyway (a machine with a real init), it is stopped through the init system.
set -euo pipefail

if command -v prometheus >/dev/null 2>&1; then
    echo "install-prometheus: $(command -v prometheus) already installed"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi

POLICY=/usr/sbin/policy-rc.d
ADDED_POLICY=0
if [ ! -e "$POLICY" ]; then
    printf '#!/bin/sh\n# added by hedge .ci/install-prometheus.sh while installing\nexit 101\n' \
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
$SUDO apt-get install -y -q --no-install-recommends prometheus

# Belt and braces: if the package's service came up anyway, stop it (and keep it from starting on boot).
if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
    $SUDO systemctl disable --now prometheus.service >/dev/null 2>&1 || true
elif [ -x /etc/init.d/prometheus ]; then
    $SUDO /etc/init.d/prometheus stop >/dev/null 2>&1 || true
fi

command -v prometheus >/dev/null 2>&1 || { echo "install-prometheus: prometheus not on PATH" >&2; exit 1; }
echo "install-prometheus: installed $(prometheus --version 2>&1 | head -n 1)"
