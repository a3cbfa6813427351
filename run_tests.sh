#!/usr/bin/env bash
# Fresh machine -> installed environment -> the test suite (pass pytest options as arguments).
set -euo pipefail
cd "$(dirname "$0")"
bash install.sh
VENV=${M2D_VENV:-.venv}
"$VENV/bin/python" -m pytest -q "$@"
