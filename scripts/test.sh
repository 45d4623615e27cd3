#!/usr/bin/env bash
# Installs everything (SoftHSM2 included) and runs the whole check: lint, format, types, tests.
# Extra arguments go to pytest (for example: bash scripts/test.sh --run-slow -k merkle).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh --dev

echo "==> ruff check"
.venv/bin/ruff check .
echo "==> ruff format --check"
.venv/bin/ruff format --check .
echo "==> mypy"
.venv/bin/mypy

echo "==> pytest"
set +e
.venv/bin/python -m pytest "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests: that is a failure, not a pass" >&2
  exit 1
fi
exit "$status"
