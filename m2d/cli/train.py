"""Pre-train M2D on log-mel spectrogram files (`m2d train`, as train_audio.py; see docs/pretraining.md).

    m2d train --dataset data/files_audioset.csv --input_size 80x608 --norm_stats "[-7.1, 4.2]"
    torchrun --nproc_per_node 4 -m m2d train --dataset ...      # DDP, 4 GPUs

Without --eval_scripts, checkpoints are evaluated with the built-in `m2d eval suite` (quick, then all).
"""
from pathlib import Path
from typing import Optional

from m2d.cli.common import guarded
from m2d.train.config import add_arguments, complete_args, parse_args  # noqa: F401  (the command's flags)
from m2d.train.main import run


def cli(mae: bool = False, script_dir: Optional[Path] = None, argv: Optional[list[str]] = None) -> int:
    """Entry point of train_audio.py / mae_train_audio.py: parse, train, and turn known failures into
    a message and an exit status (2: bad arguments or data, 1: non-finite loss, 130: interrupted).
    script_dir: the script's folder, whose quick_eval.sh / all_eval.sh run as published."""
    return guarded(lambda: run(parse_args(argv, mae), script_dir))
