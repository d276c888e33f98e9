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
if [[ ",$extras," == *",test,"* || ",$extras," == *",bench,"* ]] && grep -qw amx_int8 /proc/cpuinfo; then
  # llama.cpp (the test and benchmark peer, through llama-cpp-python) built without its AMX kernels: on CPUs
  # with AMX they crash (segfault in decode) on every quantized type llama.cpp repacks for AMX (Q4_0, Q4_1,
  # Q8_0, ...); its AVX-512 kernels and weight repacking stay. Built once into lmforge's cache, then reused.
  wheels="${XDG_CACHE_HOME:-$HOME/.cache}/lmforge/wheels/llama-cpp-no-amx"
  if ! ls "$wheels"/llama_cpp_python-*.whl >/dev/null 2>&1; then
    echo "building llama-cpp-python without AMX kernels (once, a few minutes)" >&2
    flags="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
    CMAKE_ARGS="-DCMAKE_C_FLAGS='$flags' -DCMAKE_CXX_FLAGS='$flags'" .venv/bin/python -m pip wheel --quiet \
      --disable-pip-version-check --no-cache-dir --no-deps "llama-cpp-python>=0.3" -w "$wheels.tmp"
    mkdir -p "$(dirname "$wheels")" && rm -rf "$wheels" && mv "$wheels.tmp" "$wheels"
  fi
  "${pip[@]}" --force-reinstall --no-deps "$wheels"/llama_cpp_python-*.whl
fi
if [ -n "$extras" ]; then
  "${pip[@]}" -e ".[$extras]"
else
  "${pip[@]}" -e .
fi
