#!/usr/bin/env bash
# Create .venv with the CPU stack (jax 0.10.2, torch 2.13.0 CPU) and encdec installed editable.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build.
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[cpu,test,bench]"
# espeak-ng synthesizes the Whisper test clips (Debian package; skipped where apt is absent).
if ! command -v espeak-ng >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && apt-get install -y -qq espeak-ng >/dev/null) || echo "setup: espeak-ng not installed"
fi
