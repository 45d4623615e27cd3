#!/usr/bin/env bash
# Installs what the project needs on a fresh Debian machine with Python 3.11:
#   - Debian packages, when running as root and only those that are missing: SoftHSM2 for the
#     PKCS#11 custodian key, and python3-venv when the interpreter cannot make a virtual
#     environment with pip (Debian's python3 ships venv and ensurepip in that package);
#   - a virtual environment in .venv, created only when .venv has no working pip (a broken one is
#     removed first), with the pinned dependencies (constraints.txt).
# Safe to run again: a second run changes nothing that is already in place.
# Usage: bash scripts/setup.sh          runtime dependencies (what the demo needs)
#        bash scripts/setup.sh --dev    plus test, lint and type-check tools
# PYTHON names the interpreter that creates .venv (default: python3).
set -euo pipefail
cd "$(dirname "$0")/.."

extras="fast"
if [ "${1:-}" = "--dev" ]; then
  extras="dev"
fi
python=${PYTHON:-python3}

venv_works() {
  [ -x .venv/bin/python ] && .venv/bin/python -m pip --version >/dev/null 2>&1
}

python_makes_venvs() {
  # ensurepip.version() reads the pip wheel that venv would install: on Debian both the module
  # and the wheel come with python3-venv.
  "$python" -c 'import ensurepip, venv; ensurepip.version()' >/dev/null 2>&1
}

missing=()
if ! command -v softhsm2-util >/dev/null 2>&1 || [ ! -e /usr/lib/softhsm/libsofthsm2.so ]; then
  missing+=(softhsm2)
fi
if ! venv_works && ! python_makes_venvs; then
  missing+=(python3-venv)
fi
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" = "0" ]; then
    echo "==> installing ${missing[*]} (apt)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "==> missing ${missing[*]} and this is not root: run" \
      "'sudo apt-get install -y ${missing[*]}'" >&2
  fi
fi

if ! venv_works; then
  if ! python_makes_venvs; then
    echo "==> $python cannot create a virtual environment with pip: install python3-venv" \
      "(Debian) or set PYTHON to an interpreter that has venv and ensurepip" >&2
    exit 1
  fi
  if [ -e .venv ] || [ -L .venv ]; then
    echo "==> removing .venv: it has no working pip"
    rm -rf .venv
  fi
  echo "==> creating .venv with $("$python" --version 2>&1)"
  "$python" -m venv .venv
fi
echo "==> installing Python dependencies (.[${extras}], pinned by constraints.txt)"
# setuptools notes on every editable install that folders named like the packages take precedence
# on import (here they are the packages), and pip shows that note even with -q.
PYTHONWARNINGS="${PYTHONWARNINGS:+$PYTHONWARNINGS,}ignore:Editable installation" \
  .venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[${extras}]"
echo "==> ready"
