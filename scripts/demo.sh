#!/usr/bin/env bash
# Start the demo (sets itself up first). Extra arguments go to app.py, e.g. --share, --port 7860, --model PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export GRADIO_ANALYTICS_ENABLED=False HF_HUB_DISABLE_TELEMETRY=1
exec .venv/bin/python app.py "$@"
