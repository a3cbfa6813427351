"""Reading audio files as 16 kHz mono float32, bit for bit as the published pipeline did with
librosa.load(path, sr=16000, mono=True) (librosa 0.10/0.11), without importing librosa."""
import argparse
import struct
from pathlib import Path
from typing import Optional, Union

import numpy as np
import soundfile as sf
import soxr

from m2d.errors import AudioReadError, UsageError

AUDIO_SUFFIXES = ('.wav', '.flac', '.ogg')
# The longest audio `m2d wav2lms` and `m2d encode` read by default (--max_seconds): one hour. Converting
# or encoding a file takes memory in proportion to its length (some 2 GB per hour of audio; there is one
# file per worker at a time), so a header claiming days would exhaust memory before failing. An hour is
# far beyond the clips of the usual data sets (AudioSet 10 s, FSD50K at most 30 s).
MAX_SECONDS = 3600.0


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


def wav_declared_frames(path: Union[str, Path]) -> Optional[int]:
    """The frame count the header of a RIFF/RF64 WAV file declares for its data chunk; None for other
    formats, or when the header leaves the length open (streamed files: size 0 or 0xFFFFFFFF)."""
    with open(path, 'rb') as f:
        riff = f.read(12)
        if len(riff) < 12 or riff[:4] not in (b'RIFF', b'RF64') or riff[8:12] != b'WAVE':
            return None
        block_align, data64 = 0, None
        while True:
            header = f.read(8)
            if len(header) < 8:
                return None
            chunk, size = header[:4], struct.unpack('<I', header[4:])[0]
            if chunk == b'data':
                size = data64 if size == 0xFFFFFFFF and data64 is not None else size
                return size // block_align if block_align and size not in (0, 0xFFFFFFFF) else None
            body = f.read(min(size, 64)) if chunk in (b'fmt ', b'ds64') else b''
            if chunk == b'fmt ' and len(body) >= 14:
                block_align = struct.unpack('<H', body[12:14])[0]
            if chunk == b'ds64' and len(body) >= 16:
                data64 = struct.unpack('<Q', body[8:16])[0]  # RF64: the real data size
            f.seek(size + (size & 1) - len(body), 1)  # chunks are padded to an even size


def add_max_seconds_argument(parser: argparse.ArgumentParser) -> None:
    """--max_seconds, the same for every tool that reads audio files (see MAX_SECONDS)."""
    parser.add_argument('--max_seconds', type=float, default=MAX_SECONDS,
                        help="fail files longer than this many seconds by their header, before reading any "
                             "sample: memory grows with a file's length (about 2 GB per hour of audio), so a long "
                             "or false header cannot exhaust it (default: 3600, an hour, far beyond usual clips: "
                             "AudioSet's 10 s)")


def check_max_seconds(max_seconds: float) -> None:
    """Raise ValueError unless `max_seconds` is a usable limit for load_audio (> 0; inf for none)."""
    if not max_seconds > 0:
        raise UsageError(f'--max_seconds must be more than 0 seconds, got {max_seconds:g}')


def load_audio(path: Union[str, Path], sample_rate: int = 16000, max_seconds: Optional[float] = None) -> np.ndarray:
    """Read any soundfile-readable file -> mono float32 [S] at `sample_rate`, S = ceil(S_file * sample_rate / sr).

    Equal to librosa.load(path, sr=sample_rate, mono=True)[0]: samples decoded as float32, the mean
    of the channels, soxr 'HQ' resampling. Raises AudioReadError naming the file when it cannot be
    decoded, is empty, is longer than `max_seconds` by its header (checked before any sample is read),
    is a WAV file shorter than its header says (libsndfile would silently return the part that is
    there), or holds NaN/inf samples (librosa rejects those too).
    """
    try:
        with sf.SoundFile(str(path)) as f:
            seconds = f.frames / f.samplerate
            if max_seconds is not None and seconds > max_seconds:  # from the header: nothing decoded yet
                length = f'{seconds / 3600:.1f} h of audio ({seconds:.0f} s)' if seconds >= 3600 else \
                    f'{seconds:.1f} s of audio'
                raise AudioReadError(f'{path}: {length} is over --max_seconds {max_seconds:g}; '
                                     'raise --max_seconds to read it')
            wav, sr = f.read(dtype='float32', always_2d=True), f.samplerate
        declared = wav_declared_frames(path)
    except AudioReadError:
        raise
    except Exception as e:  # soundfile raises several types for missing/corrupt/unknown formats
        raise AudioReadError(f'{path}: cannot read audio ({e})') from e
    if wav.shape[0] == 0:
        raise AudioReadError(f'{path}: the file holds no audio samples')
    if declared is not None and declared > wav.shape[0]:
        raise AudioReadError(f'{path}: truncated: header says {declared} samples, file holds {wav.shape[0]}')
    wav = mix_to_mono(wav)
    if not np.isfinite(wav).all():
        raise AudioReadError(f'{path}: the audio holds NaN or inf samples')
    return np.ascontiguousarray(resample_like_librosa(wav, sr, sample_rate))


def find_audio_files(root: Union[str, Path], suffixes: tuple[str, ...] = AUDIO_SUFFIXES) -> list[Path]:
    """All files below `root` (recursively, sorted) whose suffix is in `suffixes` (case-insensitive)."""
    suffixes = tuple(s.lower() for s in suffixes)
    return sorted(p for p in Path(root).rglob('*') if p.is_file() and p.suffix.lower() in suffixes)
