"""Reading audio files as 16 kHz mono float32, the way the published pipeline did
(librosa.load(sr=16000, mono=True): channel mean, then soxr 'HQ' resampling)."""
from pathlib import Path
from typing import Union

import numpy as np
import soundfile as sf
import soxr

AUDIO_SUFFIXES = ('.wav', '.flac', '.ogg')


class AudioReadError(RuntimeError):
    """An audio file could not be read or holds no samples."""


def load_audio(path: Union[str, Path], sample_rate: int = 16000) -> np.ndarray:
    """Read any soundfile-readable file -> mono float32 [S] at `sample_rate`.

    Raises AudioReadError naming the file when it cannot be decoded or is empty.
    """
    try:
        wav, sr = sf.read(str(path), dtype='float32', always_2d=True)
    except Exception as e:  # soundfile raises several types for missing/corrupt/unknown formats
        raise AudioReadError(f'{path}: cannot read audio ({e})') from e
    if wav.shape[0] == 0:
        raise AudioReadError(f'{path}: the file holds no audio samples')
    wav = wav.mean(axis=1)
    if sr != sample_rate:
        wav = soxr.resample(wav, sr, sample_rate, quality='HQ')
    return np.ascontiguousarray(wav, dtype=np.float32)


def find_audio_files(root: Union[str, Path], suffixes: tuple[str, ...] = AUDIO_SUFFIXES) -> list[Path]:
    """All files below `root` (recursively, sorted) whose suffix is in `suffixes` (case-insensitive)."""
    suffixes = tuple(s.lower() for s in suffixes)
    return sorted(p for p in Path(root).rglob('*') if p.is_file() and p.suffix.lower() in suffixes)
