#!/usr/bin/env bash
# One-time set-up of a fresh machine: a virtual environment in .venv with peerd and its test
# extras installed. On a machine without CUDA, torch's CPU build (2.13.0) is installed first so
# that the bare `torch` requirement does not pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "$VPY" -m pip install -q torch
  else
    "$VPY" -m pip install -q torch==2.13.0
  fi
fi
if ! "$VPY" -c "import peerd, transformers, hypothesis, libp2p" >/dev/null 2>&1 \
   || [[ pyproject.toml -nt .venv/.peerd-installed ]]; then
  "$VPY" -m pip install -q -e '.[test]'
  touch .venv/.peerd-installed
fi
