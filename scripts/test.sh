#!/usr/bin/env bash
# Install dreamguide with its test and ui extras into ./.venv and run the whole test suite offline.
# The browser tests drive Debian's Chromium: it is installed here when missing and we may (root with
# apt-get); elsewhere they are skipped with the reason. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=test,ui source scripts/_venv.sh
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1 \
        || echo "could not install chromium with apt-get; the browser tests will be skipped" >&2
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False
.venv/bin/python -m pytest "$@"
