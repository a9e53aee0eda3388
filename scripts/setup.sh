#!/usr/bin/env bash
# Create .venv and install vptdash's dependencies from the package registries (idempotent).
# torch 2.14.1 / torchvision 0.29.1 are pinned: on the project machines pip takes them from local disk.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
req=${1:-requirements.txt}
stamp=".venv/.installed-$(basename "$req")-$(cat requirements*.txt pyproject.toml | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -r "$req" 2>&1 | grep -v "is ignored: it is neither" || true
  # vptdash itself, editable: the `vptdash` command (same as `python -m vptdash`); no network needed.
  .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
  .venv/bin/python -c "import torch, torchvision, timm, streamlit, fvcore, onnx, safetensors" # fail loudly if the install did not work
  touch "$stamp"
fi
