#!/usr/bin/env bash
# Install dreamguide with its web-app extra into ./.venv and start `dreamguide ui` on the bundled
# miniature world (CPU, no downloads) at http://127.0.0.1:7860. Extra arguments go to `dreamguide ui`.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=ui source scripts/_venv.sh
export HF_HUB_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False
.venv/bin/dreamguide ui "$@"
