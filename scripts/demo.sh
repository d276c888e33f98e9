#!/usr/bin/env bash
# Set up, pull the default model (SmolLM2-135M-Instruct) and answer a prompt, streaming the text.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/lmforge pull smollm2-135m-instruct
.venv/bin/lmforge generate "${1:-Explain in three sentences why the sky is blue.}" --seed 0
