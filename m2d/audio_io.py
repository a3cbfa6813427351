"""Reading audio files as 16 kHz mono float32, bit for bit as the published pipeline did with
librosa.load(path, sr=16000, mono=True) (librosa 0.10/0.11), without importing librosa."""
from pathlib import Path
from typing import Union

import numpy as np
import soundfile as sf
import soxr

AUDIO_SUFFIXES = ('.wav', '.flac', '.ogg')


class AudioReadError(RuntimeError):
    """An audio file could not be read, holds no samples, or holds NaN/inf samples."""


def resample_like_librosa(wav: np.ndarray, sr: int, sample_rate: int) -> np.ndarray:
    """Mono float32 [S] at `sr` -> float32 [ceil(S * sample_rate / sr)] at `sample_rate`.

    librosa.resample(res_type='soxr_hq'): soxr 'HQ' on the float32 samples, then trimmed or
    zero-padded to ceil(S * ratio) samples. The length is computed with the same float expression
    as librosa (ratio first, then the product) so that it agrees with librosa to the last sample.
    """
    if sr == sample_rate:
        return wav
    n_samples = int(np.ceil(wav.shape[0] * (float(sample_rate) / sr)))
    out = soxr.resample(wav, sr, sample_rate, quality='HQ')[:n_samples]
    if out.shape[0] < n_samples:
        out = np.pad(out, (0, n_samples - out.shape[0]))
    return out.astype(np.float32, copy=False)


def mix_to_mono(wav: np.ndarray) -> np.ndarray:
    """float32 [S, C] -> [S], bit for bit the channel mean librosa.to_mono computes (np.mean over C).

    numpy sums fewer than 8 values one after another, so adding channel by channel gives the same
    bits some 30x faster than its strided reduction; with 8 or more channels numpy sums pairwise,
    so those use np.mean itself.
    """
    channels = wav.shape[1]
    if channels >= 8:
        return wav.T.mean(axis=0)
    mono = wav[:, 0].copy()
    for c in range(1, channels):
        mono += wav[:, c]
    return mono / np.float32(channels) if channels > 1 else mono


def load_audio(path: Union[str, Path], sample_rate: int = 16000) -> np.ndarray:
    """Read any soundfile-readable file -> mono float32 [S] at `sample_rate`, S = ceil(S_file * sample_rate / sr).

    Equal to librosa.load(path, sr=sample_rate, mono=True)[0]: samples decoded as float32, the mean
    of the channels, soxr 'HQ' resampling. Raises AudioReadError naming the file when it cannot be
    decoded, is empty, or holds NaN/inf samples (librosa rejects those too).
    """
    try:
        wav, sr = sf.read(str(path), dtype='float32', always_2d=True)
    except Exception as e:  # soundfile raises several types for missing/corrupt/unknown formats
        raise AudioReadError(f'{path}: cannot read audio ({e})') from e
    if wav.shape[0] == 0:
        raise AudioReadError(f'{path}: the file holds no audio samples')
    wav = mix_to_mono(wav)
    if not np.isfinite(wav).all():
        raise AudioReadError(f'{path}: the audio holds NaN or inf samples')
    return np.ascontiguousarray(resample_like_librosa(wav, sr, sample_rate))


def find_audio_files(root: Union[str, Path], suffixes: tuple[str, ...] = AUDIO_SUFFIXES) -> list[Path]:
    """All files below `root` (recursively, sorted) whose suffix is in `suffixes` (case-insensitive)."""
    suffixes = tuple(s.lower() for s in suffixes)
    return sorted(p for p in Path(root).rglob('*') if p.is_file() and p.suffix.lower() in suffixes)
