#!/usr/bin/env bash
# Installs what the project needs on a fresh Debian machine with Python 3.11:
#   - SoftHSM2 (Debian package) for the PKCS#11 custodian key, when running as root;
#   - a virtual environment in .venv with the pinned dependencies (constraints.txt).
# Usage: bash scripts/setup.sh          runtime dependencies (what the demo needs)
#        bash scripts/setup.sh --dev    plus test, lint and type-check tools
set -euo pipefail
cd "$(dirname "$0")/.."

extras="fast"
if [ "${1:-}" = "--dev" ]; then
  extras="dev"
fi

if ! command -v softhsm2-util >/dev/null 2>&1 || [ ! -e /usr/lib/softhsm/libsofthsm2.so ]; then
  if [ "$(id -u)" = "0" ]; then
    echo "==> installing SoftHSM2 (apt)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq softhsm2 >/dev/null
  else
    echo "==> SoftHSM2 is missing and this is not root: run 'sudo apt-get install -y softhsm2'" >&2
  fi
fi

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv with $($python --version)"
  "$python" -m venv .venv
fi
echo "==> installing Python dependencies (.[${extras}], pinned by constraints.txt)"
.venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[${extras}]"
echo "==> ready"
