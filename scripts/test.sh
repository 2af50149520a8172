#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite. README.md and .ci/run both call this.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
ruff check encdec pallas_kernels tests scripts
# One pytest process per test folder: a single process accumulating thousands of XLA
# compilations crashed once inside XLA:CPU's compiler (and tests/sharding sets JAX's device
# count before JAX starts, which needs a process of its own). pytest exits 5 when it collects
# nothing; set -e turns that (and any failure) into a failed run.
status=0
decoding="tests/engine/test_beams.py tests/engine/test_decoding.py tests/engine/test_memory_policies.py"
ignore_decoding=$(for f in $decoding; do printf -- "--ignore=%s " "$f"; done)
for group in "tests/test_*.py" tests/models tests/checkpoints tests/cache tests/pallas_kernels \
             "tests/engine $ignore_decoding" "$decoding" tests/lora tests/bench tests/whisper tests/serving \
             tests/notebooks tests/sharding; do
  echo "== pytest $group"
  # shellcheck disable=SC2086  # a group is several words
  python -m pytest -p no:cacheprovider $group "$@" || status=$?
done
exit $status
