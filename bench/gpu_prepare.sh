#!/usr/bin/env bash
# Make the two ignored folders a GPU session carries (bench/gpu_session.sh), here, where PyPI can be reached:
#   .whl/        wheels of m2d's needs that the GPU machine's image lacks (Python 3.12, manylinux x86_64):
#                nnAudio, soundfile (+ cffi, pycparser), soxr, and the timm this checkout is tested with
#   .published/  the published implementation, rebuilt from its public sources, and the timm 0.4.12 wheel
#                it runs with (never committed: its own licence; bench/bench_published.py reads it)
# Usage: bash bench/gpu_prepare.sh PUBLISHED_DIR   (the first release of nttcslab/m2d, set up as its README
# describes; it is copied, never built here)
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { echo "usage: $0 PUBLISHED_DIR (the published m2d code's folder)" >&2; exit 2; }
PUBLISHED=$1
PY=${M2D_PYTHON:-.venv/bin/python}
[ -f "$PUBLISHED/m2d/models_mae.py" ] || { echo "error: $PUBLISHED is not the published m2d tree (no m2d/models_mae.py); pass its folder" >&2; exit 2; }
version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
download() {  # wheels for the GPU machine's Python 3.12 on x86_64, whatever this machine runs
    "$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform any -d "$@"
}
rm -rf .whl .published
mkdir -p .whl .published/wheels
for pkg in nnAudio soundfile soxr cffi pycparser timm; do
    download .whl "$pkg==$(version "$pkg")"
done
download .published/wheels timm==0.4.12
mkdir -p .published/m2d
tar -C "$PUBLISHED" --exclude __pycache__ --exclude .git --exclude './data/*' -cf - . | tar -C .published/m2d -xf -
git check-ignore .whl .published >/dev/null || { echo "error: .whl or .published is not ignored by git" >&2; exit 2; }
du -sh .whl .published
