#!/usr/bin/env bash
# Quick linear evaluation of a checkpoint, then the summary table (./results/scores.csv, ./results/summary.md).
# train_audio.py starts it in the background for saved checkpoints (from --eval_after on):
#   bash quick_eval.sh /abs/path/m2d_vit_base-80x608p16x16-YYMMDD-mr7/checkpoint-100.pth [more `m2d eval suite` options]
# Tasks: the quick suite (demo cremad gtzan), or $M2D_EVAL_TASKS. EVAR tasks run when their data is below
# $M2D_EVAL_DATA (else they are skipped), or through EVAR itself when $EVAR_ROOT is an EVAR checkout.
# Python: $M2D_PYTHON, else the .venv beside this script, else python3.
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: $0 CHECKPOINT [m2d eval suite options]" >&2; exit 2; }
CHECKPOINT=$1
shift
PY=${M2D_PYTHON:-}
if [ -z "$PY" ]; then
    PY="$(dirname "$0")/.venv/bin/python"
    [ -x "$PY" ] || PY=python3
fi
# shellcheck disable=SC2086  # M2D_EVAL_TASKS is a list of words
exec "$PY" -m m2d eval suite "$CHECKPOINT" --config "${M2D_EVAL_SUITE:-quick}" ${M2D_EVAL_TASKS:+--tasks $M2D_EVAL_TASKS} "$@"
