#!/usr/bin/env bash
# Create (or reuse) the virtual environment and install requirements; skipped when nothing changed.
# Sourced by quickstart.sh and test.sh. VENV overrides the location (default .venv in the repo root).
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$REPO_ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
stamp="$VENV/.ddpm_ood_requirements.sha256"
want="$(cd "$REPO_ROOT" && cat requirements.txt requirements-dev.txt pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
  echo "[setup] installing requirements (torch is large: a few minutes on a fresh machine)"
  # The CUDA build of torch needs about 6 GB in the environment plus pip's temporary files; a full disk otherwise
  # shows up as a bare "No space left on device" deep inside pip.
  free_kb="$(df -Pk "$(dirname "$VENV")" | awk 'NR==2 {print $4}' || true)"
  if [ -n "$free_kb" ] && [ "$free_kb" -lt $((8 * 1024 * 1024)) ]; then
    echo "[setup] WARNING: only $((free_kb / 1024)) MB free under $(dirname "$VENV"); installing needs about 8 GB" >&2
  fi
  (cd "$REPO_ROOT" && python -m pip install -q --upgrade pip && python -m pip install -q -r requirements-dev.txt)
  echo "$want" > "$stamp"
else
  echo "[setup] requirements already installed in $VENV"
fi
