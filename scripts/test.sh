#!/usr/bin/env bash
# One command: install (first time only) and run the whole test suite, browser test included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh requirements-dev.txt
# The end-to-end test drives Debian's Chromium (browsers cannot be downloaded here).
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  fi
fi
# The structure rules (pyproject.toml): layers and no import cycles, lint, format.
.venv/bin/lint-imports --no-cache >/dev/null || { .venv/bin/lint-imports --no-cache; exit 1; }
.venv/bin/ruff check --quiet .
.venv/bin/ruff format --check --quiet .
if [ -z "${VPTDASH_HOME:-}" ]; then
  # A data dir of the suite's own, removed afterwards (pytest's exit status is kept).
  VPTDASH_HOME=$(mktemp -d)
  export VPTDASH_HOME
  # The local Ray clusters of the cluster tests keep their session dirs there too (Ray's own default,
  # /tmp/ray, keeps every session).
  export RAY_TMPDIR="${RAY_TMPDIR:-$VPTDASH_HOME}"
  trap 'rm -rf "$VPTDASH_HOME"' EXIT
fi
.venv/bin/python -m pytest -q "$@"
