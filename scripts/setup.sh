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
python -m pip install -q -e ".[cpu,audio,test,bench]"
# espeak-ng synthesizes the Whisper test clips; bible-kjv (the `bible` program) and bible-kjv-text
# (the King James Version, public domain) are the text of the long Whisper recordings; fortunes and
# fortunes-min (BSD) the sayings of experiments/whisper_lora.yaml; g++ builds the CPU kernels
# (pallas_kernels/{int8_matmul,decode_matmul,window_attention,argmax,put_rows}). Debian packages; skipped where apt is absent.
if { ! command -v espeak-ng || ! command -v bible || [ ! -f /usr/share/games/fortunes/wisdom ] \
     || ! command -v g++; } \
   >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && apt-get install -y -qq espeak-ng bible-kjv bible-kjv-text fortunes fortunes-min \
    g++ >/dev/null) || echo "setup: espeak-ng / bible-kjv / fortunes / g++ not installed"
fi
# Build the CPU kernels now rather than on first use (each prints why where it cannot run).
python -m pallas_kernels.build_all
