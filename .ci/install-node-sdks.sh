#!/usr/bin/env bash
# Install node (Debian's `nodejs` and `npm` packages) and the Node clients tests/integration/test_node_sdks.py runs:
# the OpenAI Node SDK and the Vercel AI SDK, at the versions tests/node/package-lock.json pins.
# Idempotent: apt-get runs only when `node` or `npm` is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

bash .ci/apt-install.sh node,npm nodejs npm
npm ci --prefix tests/node --no-audit --no-fund
echo "install-node-sdks: node $(node --version), $(ls tests/node/node_modules | tr '\n' ' ')"
