#!/usr/bin/env bash
# Quick linear evaluation of a checkpoint, then the summary table (results/scores.csv, results/summary.md).
# train_audio.py starts it in the background for saved checkpoints:
#   bash quick_eval.sh /abs/path/m2d_vit_base-80x608p16x16-YYMMDD-mr7/checkpoint-100.pth [more `python -m m2d.eval suite` options]
# EVAR tasks run when their data is below $M2D_EVAL_DATA (else they are skipped), or through EVAR itself
# when $EVAR_ROOT is an EVAR checkout. Python: $M2D_PYTHON, else .venv/bin/python, else python3.
set -euo pipefail
TASKS="demo cremad gtzan"   # edit: demo, a metadata CSV, or EVAR tasks (esc50 us8k spcv2 vc1 voxforge cremad gtzan nsynth surge)
TASKS=${M2D_EVAL_TASKS:-$TASKS}
SUITE=${M2D_EVAL_SUITE:-quick}
[ $# -ge 1 ] || { echo "usage: $0 CHECKPOINT [python -m m2d.eval suite options]" >&2; exit 2; }
CHECKPOINT=$1
shift
case "$CHECKPOINT" in /* | random) ;; *) CHECKPOINT="$PWD/$CHECKPOINT" ;; esac
cd "$(dirname "$0")"
PY=${M2D_PYTHON:-}
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
# shellcheck disable=SC2086  # TASKS is a list of words
exec "$PY" -m m2d.eval suite "$CHECKPOINT" --config "$SUITE" --tasks $TASKS "$@"
