#!/usr/bin/env bash
# System packages for lmforge's document ingest and its tests: the R manuals (benchmark data),
# Tesseract (OCR of pages without a text layer), Chromium and its driver (review page browser test).
# Idempotent and quiet: installs only what is missing; needs root (or sudo) and Debian's apt.
set -euo pipefail
packages=(r-doc-pdf tesseract-ocr chromium chromium-driver python3.11-doc)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if ! command -v apt-get >/dev/null; then
  echo "setup_data_deps: apt-get not found; install ${missing[*]} by hand (tests that need them skip)" >&2
  exit 0
fi
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq >/dev/null
$SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
