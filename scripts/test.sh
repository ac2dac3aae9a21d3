#!/usr/bin/env bash
# Run the whole test suite on the CPU (sets itself up first). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --dev
export GRADIO_ANALYTICS_ENABLED=False HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 OMP_NUM_THREADS=2
.venv/bin/python -m pytest -q "$@"
if (( $# == 0 )); then
  # The GPU decode kernels, run on the CPU in Triton's interpreter (float32, small shapes; tests/test_cuda.py runs
  # them on a GPU). Triton lives in its own folder (scripts/setup.sh), so the suite above runs without it.
  TRITON_INTERPRET=1 TRITON_DEFAULT_FP_FUSION=1 PYTHONPATH=.venv/triton-interpreter \
    .venv/bin/python -m pytest -q tests/test_kernels_interpret.py
fi
