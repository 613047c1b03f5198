#!/usr/bin/env bash
# Create .venv with the pinned stack if it is missing (idempotent).
# Usage: scripts/bootstrap.sh   (VENV=path to override)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PY="${PYTHON:-python3.11}"
STAMP="$VENV/.stamp-$(sha1sum requirements.lock pyproject.toml | sha1sum | cut -c1-12)"
if [[ -f "$STAMP" ]]; then exit 0; fi
echo "[bootstrap] creating $VENV with the pinned stack (first time: a few minutes)" >&2
rm -rf "$VENV"
"$PY" -m venv "$VENV"
"$VENV/bin/pip" install -qq --upgrade "pip<25" wheel
"$VENV/bin/pip" install -qq -r requirements.lock
# TFF last and without its own pins (they ask for jaxlib 0.4.14, not on the index).
"$VENV/bin/pip" install -qq --no-deps tensorflow-federated==0.87.0
"$VENV/bin/pip" install -qq --no-deps -e .
touch "$STAMP"
echo "[bootstrap] ready: $VENV" >&2
