"""Audio files -> log-mel spectrogram .npy files for pre-training (see m2d/tools/wav_to_lms.py; also `m2d wav2lms`).

    python wav_to_lms.py /your/local/fsd50k/FSD50K.dev_audio data/lms_fsd50kdev --csv data/files_fsd50k.csv
"""
import sys

import m2d.tools.wav_to_lms
from m2d.cli.common import run_tool

if __name__ == '__main__':
    sys.exit(run_tool(m2d.tools.wav_to_lms, 'wav_to_lms.py'))
