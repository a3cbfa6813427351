"""Pre-train M2D on log-mel spectrogram files (`m2d train`, as train_audio.py; see docs/pretraining.md).

    m2d train --dataset data/files_audioset.csv --input_size 80x608 --norm_stats "[-7.1, 4.2]"
    torchrun --nproc_per_node 4 -m m2d train --dataset ...      # DDP, 4 GPUs

Without --eval_scripts, checkpoints are evaluated with the built-in `m2d eval suite` (quick, then all).
"""
from m2d.train.config import add_arguments, complete_args  # noqa: F401  (the command's flags)
from m2d.train.main import run  # noqa: F401
