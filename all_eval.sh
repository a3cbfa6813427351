#!/usr/bin/env bash
# Final linear evaluation of a checkpoint on all tasks, then the summary table; train_audio.py runs it at the end:
#   bash all_eval.sh /abs/path/m2d_vit_base-80x608p16x16-YYMMDD-mr7/checkpoint-300.pth [more suite options]
# Tasks: the whole suite (demo and the published table's), or $M2D_EVAL_TASKS; the rest as quick_eval.sh.
set -euo pipefail
M2D_EVAL_SUITE=all exec bash "$(dirname "$0")/quick_eval.sh" "$@"
