# Shared by demo.sh, ui.sh and test.sh: create ./.venv and install dreamguide with the extras in EXTRAS
# (default: test). TORCH_SPEC picks the torch build (default: the pinned CPU-friendly release the tests use).
python3 -m venv .venv
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
.venv/bin/python -m pip install -q -e ".[${EXTRAS:-test}]"
