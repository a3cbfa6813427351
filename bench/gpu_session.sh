#!/usr/bin/env bash
# The prepared GPU session of issue 21 (bench/gpu_session.py says what it measures and writes).
#
# On the GPU machine, through the device tool, from the repository root:
#   bash bench/gpu_prepare.sh PUBLISHED_DIR   # here, once: makes the ignored .whl/ and .published/ it carries
#   run(command="bash bench/gpu_session.sh", carry=[".whl", ".published"], timeout_s=600)
# There the image's python3 runs it, with the wheels of .whl/ (m2d's needs the image lacks) installed
# into /tmp/m2d-site, and this checkout on PYTHONPATH (m2d is not installed there).
# Here, to test it: bash bench/gpu_session.sh --cpu-smoke   (toy sizes on the CPU, with .venv's python)
set -uo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--cpu-smoke" ]; then
    PY=${M2D_PYTHON:-.venv/bin/python}
else
    PY=${M2D_PYTHON:-python3}
    [ -d .whl ] && [ -d .published ] || { echo "error: .whl/ or .published/ is missing: run bash bench/gpu_prepare.sh PUBLISHED_DIR here and carry both" >&2; exit 2; }
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/m2d-site .whl/*.whl \
        || { echo "error: installing the wheels of .whl/ failed (see above)" >&2; exit 2; }
    export PYTHONPATH=/tmp/m2d-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
exec "$PY" -m bench.gpu_session "$@"
