#!/usr/bin/env bash
# Create .venv and install earmark with the CPU build of torch (a bare `torch` would pull CUDA wheels).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q torch==2.13.0
# tinysoundfont declares pyaudio, which does not build here and is not needed for rendering.
.venv/bin/python -m pip install -q --no-deps tinysoundfont
.venv/bin/python -m pip install -q -e ".[dev]"
