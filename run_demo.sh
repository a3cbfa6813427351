#!/usr/bin/env bash
# Fresh machine -> installed environment -> the main job on built-in demo data (see m2d/tools/demo.py):
# generate audio, convert to LMS, pre-train a small M2D on CPU, encode with RuntimeM2D, linear-evaluate.
set -euo pipefail
cd "$(dirname "$0")"
bash install.sh
VENV=${M2D_VENV:-.venv}
"$VENV/bin/python" -m m2d demo "$@"
