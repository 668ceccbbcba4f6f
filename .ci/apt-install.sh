#!/usr/bin/env bash
# Install Debian packages for the tests, unless what they provide is already on PATH.
#
#   .ci/apt-install.sh [--service NAME] COMMAND[,COMMAND...] PACKAGE [PACKAGE...]
#
# Does nothing when every COMMAND is on PATH (idempotent); else apt-get installs the PACKAGEs (nothing
# downloaded by hand) and checks that the COMMANDs now exist.
#
# --service NAME: the package ships a service the tests must not find running (they start their own
# Prometheus or redis-server on a loopback port with a temporary directory). While the package
# installs, a policy-rc.d that denies every service start is in place (Docker images ship one already;
# ours is added only if there is none, and removed again). Should the service have started anyway (a
# machine with a real init), it is stopped and disabled through the init system.
set -euo pipefail

SERVICE=""
if [ "${1:-}" = "--service" ]; then
    SERVICE="$2"
    shift 2
fi
[ $# -ge 2 ] || { echo "usage: $0 [--service NAME] COMMAND[,COMMAND...] PACKAGE..." >&2; exit 2; }
IFS=, read -r -a COMMANDS <<< "$1"
shift
ME="apt-install(${COMMANDS[*]})"

missing() {
    local c
    for c in "${COMMANDS[@]}"; do
        command -v "$c" >/dev/null 2>&1 || return 0
    done
    return 1
}

if ! missing; then
    echo "$ME: already installed ($(command -v "${COMMANDS[0]}"))"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi

POLICY=/usr/sbin/policy-rc.d
ADDED_POLICY=0
if [ -n "$SERVICE" ] && [ ! -e "$POLICY" ]; then
    printf '#!/bin/sh\n# added by hedge .ci/apt-install.sh while installing\nexit 101\n' \
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
$SUDO apt-get install -y -q --no-install-recommends "$@"

if [ -n "$SERVICE" ]; then
    # belt and braces: if the package's service came up anyway, stop it and keep it from starting on boot
    if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
        $SUDO systemctl disable --now "$SERVICE.service" >/dev/null 2>&1 || true
    elif [ -x "/etc/init.d/$SERVICE" ]; then
        $SUDO "/etc/init.d/$SERVICE" stop >/dev/null 2>&1 || true
    fi
fi

if missing; then
    echo "$ME: still missing after installing $*" >&2
    exit 1
fi
echo "$ME: installed $*"
