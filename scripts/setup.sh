#!/usr/bin/env bash
# Create .venv and install lmforge into it. torch is pinned first (a CPU build on these
# machines), so no later dependency can pull a multi-GB CUDA build.
# Usage: bash scripts/setup.sh [EXTRAS]   e.g. EXTRAS=test or test,bench
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" --upgrade pip
"${pip[@]}" "torch==2.13.0"
if [ -n "$extras" ]; then
  "${pip[@]}" -e ".[$extras]"
else
  "${pip[@]}" -e .
fi
