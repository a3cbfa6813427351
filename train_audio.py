"""Pre-train M2D on log-mel spectrogram files: python train_audio.py --help (see docs/pretraining.md)."""
import sys
from pathlib import Path

from m2d.cli.train import cli

if __name__ == '__main__':
    sys.exit(cli(mae=False, script_dir=Path(__file__).resolve().parent))
