#!/usr/bin/env bash
# Build a wheel from this tree, install it in a fresh virtual environment outside the checkout,
# and run `peerd demo` from there: proves that nothing of the checkout is needed at run time.
# Usage: bash scripts/check_wheel.sh [WORKDIR]   (default: a temporary directory)
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-$(mktemp -d /tmp/peerd-wheel-XXXX)}
PY=${PYTHON:-python3}
"$PY" -m pip wheel -q --no-deps -w "$WORK/dist" .
"$PY" -m venv "$WORK/venv"
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  "$WORK/venv/bin/pip" install -q torch
else
  "$WORK/venv/bin/pip" install -q torch==2.13.0
fi
"$WORK/venv/bin/pip" install -q "$WORK"/dist/peerd-*.whl
cd "$WORK"  # far from the checkout: only the installed package can be imported
"$WORK/venv/bin/peerd" demo --workdir "$WORK/demo"
echo "wheel OK: $(ls "$WORK"/dist/peerd-*.whl)"
