#!/usr/bin/env bash
# Install node (Debian's `nodejs` and `npm` packages) and the Node clients tests/integration/test_node_sdks.py runs:
# the OpenAI Node SDK and the Vercel AI SDK, at the versions tests/node/package-lock.json pins.
# Idempotent: apt-get runs only when `node` or `npm` is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -q
    $SUDO apt-get install -y -q --no-install-recommends nodejs npm
fi
npm ci --prefix tests/node --no-audit --no-fund
echo "install-node-sdks: node $(node --version), $(ls tests/node/node_modules | tr '\n' ' ')"
