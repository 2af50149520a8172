#!/usr/bin/env bash
# The whole GPU check in one command (for a lent H100/H200; installs nothing):
#   bash scripts/gpu_check.sh OUT_DIR
# 1. Pallas kernel tests on the device (the non-interpret test class) and the Triton lowering,
# 2. the paged-attention benchmark (Pallas vs XLA, T5-base and BART-large shapes),
# 3. the engine: Pallas vs XLA vs reference tokens, and throughput vs HF generate.
# Then, in a second call where device time is left: issue 15's int8 vs bfloat16 decode steps,
#   encdec run experiments/bench_gpu_int8.yaml --out OUT_DIR/int8
set -uo pipefail
out=${1:-${OUT:-/tmp/gpu_out}}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
nvidia-smi -L | tee "$out/device.txt"
python -c "import jax, jaxlib; print('jax', jax.__version__, jax.devices())" | tee -a "$out/device.txt"
timeout 120 python -m pytest tests/pallas_kernels -q -rs -p no:cacheprovider \
  -k "(PagedAttentionTest and not Interpret) or triton" 2>&1 | tee "$out/kernel_tests.log"
timeout 180 python -m pallas_kernels.bench --max-seconds 120 --out "$out/bench_paged_attention.json" 2>&1 \
  | tee "$out/bench_paged_attention.log"
timeout 270 python scripts/gpu_engine_check.py --out "$out/engine.json" 2>&1 | grep -v "Writing\|Loading weights" \
  | tee "$out/engine.log"
