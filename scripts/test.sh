#!/usr/bin/env bash
# Run the whole test suite on the CPU (sets itself up first). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --dev
export GRADIO_ANALYTICS_ENABLED=False HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 OMP_NUM_THREADS=2
exec .venv/bin/python -m pytest -q "$@"
