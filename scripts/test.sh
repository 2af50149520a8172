#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite. README.md and .ci/run both call this.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
ruff check encdec pallas_kernels tests
# pytest exits 5 when it collects nothing: set -e turns that (and any failure) into a failed run.
python -m pytest -q -p no:cacheprovider "$@"
