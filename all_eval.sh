#!/usr/bin/env bash
# Final linear evaluation of a checkpoint on all tasks, then the summary table; train_audio.py runs it at the end:
#   bash all_eval.sh /abs/path/m2d_vit_base-80x608p16x16-YYMMDD-mr7/checkpoint-300.pth [more suite options]
# Same interpreter, data and EVAR rules as quick_eval.sh.
set -euo pipefail
TASKS="demo esc50 us8k spcv2 vc1 voxforge cremad gtzan nsynth surge"   # edit to choose tasks
M2D_EVAL_TASKS=${M2D_EVAL_TASKS:-$TASKS} M2D_EVAL_SUITE=all exec bash "$(dirname "$0")/quick_eval.sh" "$@"
