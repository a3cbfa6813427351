#!/usr/bin/env bash
# Install m2d and its dependencies into a virtual environment (default .venv; set M2D_VENV to change).
# torch/torchvision are pinned by constraints.txt; everything else follows requirements.txt ranges.
set -euo pipefail
cd "$(dirname "$0")"
VENV=${M2D_VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[test]"
# The official HEAR validator, for tests/test_hear.py. Its only release requires TensorFlow, which it
# needs for TensorFlow models alone: installed without it (the test stands a small module in its place).
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps hearvalidator==2021.0.2
echo "m2d installed in $VENV ($("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)'))"
