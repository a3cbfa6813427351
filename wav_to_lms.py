"""Audio files -> log-mel spectrogram .npy files for pre-training (see m2d/wav_to_lms.py).

    python wav_to_lms.py /your/local/fsd50k/FSD50K.dev_audio data/lms_fsd50kdev --csv data/files_fsd50k.csv
"""
import fire

from m2d.wav_to_lms import main

if __name__ == '__main__':
    fire.Fire(main)
