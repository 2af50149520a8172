#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite. README.md and .ci/run both call this.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
ruff check encdec pallas_kernels tests scripts
# One pytest process per test folder (per file in tests/engine, which compiles the most): a
# single process accumulating thousands of XLA compilations crashed inside XLA:CPU's compiler,
# and tests/sharding sets JAX's device count before JAX starts. pytest exits 5 when it
# collects nothing, which fails the run like any failure.
#
# Tiny-model tests are mostly XLA compilation, which uses one core: two lanes of groups run
# side by side (balanced by their measured times), each lane's output printed when it ends.
#
# A group written "real: PATHS" runs without FAST_XLA_FLAGS (below): the real Whisper-base tests.
lane1=(tests/engine/test_engine.py tests/engine/test_engine_whisper.py tests/engine/test_lifecycle.py
       tests/engine/test_memory_policies.py tests/sharding
       "real: tests/whisper/test_real_longform.py tests/whisper/test_real_whisper.py
        tests/engine/test_engine_whisper_base.py"
       "tests/whisper --ignore=tests/whisper/test_real_longform.py --ignore=tests/whisper/test_real_whisper.py"
       tests/models)
lane2=(tests/engine/test_engine_lora.py tests/engine/test_bad_input.py tests/engine/test_beams.py
       tests/notebooks tests/lora tests/bench tests/serving tests/engine/test_engine_families.py
       # small groups share a process (each process spends ~4 s importing jax, torch, transformers)
       "tests/engine/test_engine_traffic.py tests/engine/test_decoding.py tests/test_*.py tests/cache
        tests/pallas_kernels tests/engine/test_scheduler_properties.py tests/engine/test_fixtures.py
        tests/checkpoints")

# Every test file must be in a lane: a new file in tests/engine, or a new folder, goes in one.
listed=" $(echo ${lane1[*]} ${lane2[*]}) "  # echo: one space between paths
for path in tests/engine/test_*.py tests/*/; do
  path=${path%/}
  case "$path" in tests/__pycache__|tests/engine) continue ;; esac
  if [[ "$listed" != *" $path "* ]]; then
    echo "scripts/test.sh: $path is in no lane" >&2
    exit 1
  fi
done

run_lane() {
  local status=0 group
  for group in "$@"; do
    local flags=$FAST_XLA_FLAGS
    if [[ $group == "real: "* ]]; then group=${group#real: } flags=""; fi
    # shellcheck disable=SC2086  # echo: trimmed (XLA reads a value not starting "--" as a file)
    flags=$(echo $flags ${XLA_FLAGS:-})
    echo "== pytest $(echo $group) (at ${SECONDS}s)"  # echo: a merged group on one line
    # shellcheck disable=SC2086  # "tests/test_*.py" expands here
    XLA_FLAGS="$flags" python -m pytest -p no:cacheprovider $group "${PYTEST_ARGS[@]}" || status=$?
  done
  echo "== lane done at ${SECONDS}s, status $status"
  return $status
}

PYTEST_ARGS=("$@")
logs=$(mktemp -d)
# Many groups compile the same tiny models' steps: JAX's persistent cache, fresh for this run and
# shared by both lanes, compiles each once. (A half-written entry read by the other lane fails
# to decode: JAX warns and compiles it.)
export JAX_COMPILATION_CACHE_DIR="$logs/jax-cache"
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=0
# Tiny models run in microseconds: LLVM's optimization of their fused loops costs more than it
# saves (test_engine.py 129 -> 97 s, test_parity.py 68 -> 53 s). Matmuls call the same
# oneDNN/Eigen kernels at any level. The real Whisper-base tests turn them back on (tests/conftest.py).
export JAX_DISABLE_MOST_OPTIMIZATIONS=${JAX_DISABLE_MOST_OPTIMIZATIONS:-1}
# XLA:CPU's older loop emitters compile tiny models' fusions faster still (test_parity.py 54 ->
# 42 s, test_engine.py 97 -> 74) but run a real model's slower (the real Whisper-base tests 68
# -> 85 s): those run in a group of their own without them.
FAST_XLA_FLAGS="--xla_cpu_use_fusion_emitters=false"
trap 'rm -rf "$logs/jax-cache"' EXIT
run_lane "${lane1[@]}" >"$logs/1" 2>&1 & pid1=$!
run_lane "${lane2[@]}" >"$logs/2" 2>&1 & pid2=$!
status=0
wait $pid1 || status=$?
cat "$logs/1"
wait $pid2 || status=$?
cat "$logs/2"
echo "== done in ${SECONDS}s"
exit $status
