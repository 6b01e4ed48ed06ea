#!/usr/bin/env bash
# Install dreamguide into ./.venv and run the demo on the bundled miniature world (CPU, no downloads).
# Extra arguments go to `dreamguide demo` (see `dreamguide demo --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_venv.sh
export HF_HUB_OFFLINE=1
.venv/bin/dreamguide demo --output demo-output "$@"
