#!/usr/bin/env bash
# Set up (Python packages, system packages the tests use, both real models), then run the suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not real_model"`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
bash scripts/setup_data_deps.sh
.venv/bin/lmforge pull smollm2-135m-instruct
.venv/bin/lmforge pull gemma3-270m
.venv/bin/python -c "from lmforge.data import sotu; sotu.install()" \
  || echo "warning: State of the Union corpus not installed; the tests that need it skip" >&2
exec .venv/bin/python -m pytest -q "$@"
