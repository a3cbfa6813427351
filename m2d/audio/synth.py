"""Procedural sound events for the built-in demo corpus and demo task (no downloads).

Each event kind is a small family of sounds with random parameters (pitch, duration, envelope,
rate), so a model has something real to learn and a linear probe something real to separate.
"""
from pathlib import Path
from typing import Optional, Union

import numpy as np
import soundfile as sf
from scipy.signal import lfilter

EVENT_KINDS = ('tone', 'chord', 'noise_burst', 'chirp', 'clicks', 'am_tone', 'fm_tone', 'harmonic')


def _envelope(rng: np.random.Generator, n: int, sample_rate: int) -> np.ndarray:
    """Attack-decay envelope [n] with random attack (2-50 ms) and exponential decay."""
    attack = max(1, int(sample_rate * rng.uniform(0.002, 0.05)))
    env = np.exp(-np.arange(n) / (n * rng.uniform(0.2, 1.5)))
    env[:attack] *= np.linspace(0, 1, min(attack, n))
    return env


def synth_event(kind: str, rng: np.random.Generator, sample_rate: int, seconds: float) -> np.ndarray:
    """One sound event of `kind` (see EVENT_KINDS) -> float32 [round(seconds * sample_rate)], peak <= 1."""
    n = max(1, int(round(seconds * sample_rate)))
    t = np.arange(n) / sample_rate
    nyquist = sample_rate / 2
    f0 = rng.uniform(80, min(2000, nyquist / 4))
    if kind == 'tone':
        x = np.sin(2 * np.pi * f0 * t + rng.uniform(0, 2 * np.pi))
    elif kind == 'chord':
        chords = ([1, 5 / 4, 3 / 2], [1, 6 / 5, 3 / 2], [1, 4 / 3, 2], [1, 3 / 2, 2, 5 / 2])
        ratios = chords[int(rng.integers(len(chords)))]
        x = sum(np.sin(2 * np.pi * f0 * r * t + rng.uniform(0, 2 * np.pi)) for r in ratios)
    elif kind == 'noise_burst':
        x = rng.standard_normal(n)
        if rng.random() < 0.5:  # coloured: a one-pole low-pass with a random cutoff
            alpha = rng.uniform(0.05, 0.6)
            x = lfilter([alpha], [1, alpha - 1], x)
    elif kind == 'chirp':
        f1 = rng.uniform(100, nyquist * 0.8)
        phase = 2 * np.pi * (f0 * t + (f1 - f0) * t ** 2 / (2 * max(seconds, 1e-3)))
        x = np.sin(phase)
    elif kind == 'clicks':
        x = np.zeros(n)
        period = max(1, int(sample_rate / rng.uniform(2, 40)))
        click = np.exp(-np.arange(min(n, int(0.004 * sample_rate) + 1)) / (0.0008 * sample_rate))
        for start in range(int(rng.integers(0, period)), n, period):
            seg = click[:n - start]
            x[start:start + len(seg)] += seg * rng.choice([-1, 1])
    elif kind == 'am_tone':
        rate = rng.uniform(2, 30)
        x = (0.5 + 0.5 * np.sin(2 * np.pi * rate * t)) * np.sin(2 * np.pi * f0 * t)
    elif kind == 'fm_tone':
        rate, depth = rng.uniform(1, 12), rng.uniform(0.02, 0.2) * f0
        x = np.sin(2 * np.pi * f0 * t + depth / rate * np.sin(2 * np.pi * rate * t))
    elif kind == 'harmonic':
        n_harm = int(max(1, min(12, nyquist // f0 - 1)))
        decay = rng.uniform(0.5, 1.5)
        x = sum(np.sin(2 * np.pi * f0 * k * t) / k ** decay for k in range(1, n_harm + 1))
    else:
        raise ValueError(f'unknown event kind {kind!r}; choose from {EVENT_KINDS}')
    x = x * _envelope(rng, n, sample_rate)
    return (x / (np.abs(x).max() + 1e-9)).astype(np.float32)


def synth_clip(rng: np.random.Generator, sample_rate: int, seconds: float,
               kinds: Optional[tuple[str, ...]] = None, n_events: tuple[int, int] = (1, 4),
               noise_db: tuple[float, float] = (-60, -30)) -> np.ndarray:
    """A clip [round(seconds * sample_rate)] mixing random events at random onsets over a noise floor."""
    kinds = kinds or EVENT_KINDS
    n = max(1, int(round(seconds * sample_rate)))
    clip = rng.standard_normal(n) * 10 ** (rng.uniform(*noise_db) / 20)
    for _ in range(int(rng.integers(n_events[0], n_events[1] + 1))):
        length = rng.uniform(0.1, max(0.11, seconds))
        event = synth_event(str(rng.choice(kinds)), rng, sample_rate, length)[:n]
        start = int(rng.integers(0, max(1, n - len(event) + 1)))
        clip[start:start + len(event)] += event * 10 ** (rng.uniform(-20, 0) / 20)
    return (0.9 * clip / (np.abs(clip).max() + 1e-9)).astype(np.float32)


def write_corpus(dst: Union[str, Path], n_files: int, seed: int = 0, seconds: tuple[float, float] = (1.0, 8.0),
                 sample_rates: tuple[int, ...] = (8000, 16000, 22050, 44100, 48000),
                 stereo_ratio: float = 0.2) -> list[Path]:
    """Write `n_files` unlabelled demo clips as wav below dst (in a few sub-folders), of random
    lengths, sample rates and channel counts. Returns their paths."""
    rng = np.random.default_rng(seed)
    dst = Path(dst)
    paths = []
    for i in range(n_files):
        sr = int(rng.choice(sample_rates))
        clip = synth_clip(rng, sr, float(rng.uniform(*seconds)))
        if rng.random() < stereo_ratio:  # a second channel with a different gain and a little noise
            clip = np.stack([clip, 0.7 * clip + 0.01 * rng.standard_normal(len(clip))], axis=1)
        path = dst / f'part{i % 4}' / f'clip{i:05d}.wav'
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, np.clip(clip, -1, 1), sr)
        paths.append(path)
    return paths


SPLITS = ('train', 'valid', 'test')


def _labelled_clip(rng: np.random.Generator, kinds: tuple[str, ...], sample_rate: int, seconds: float,
                   distractors: tuple[str, ...]) -> np.ndarray:
    """1-2 events of each kind in `kinds` at random onsets over a noise floor, plus (half the time) a
    quieter event of another kind, so the label is the dominant sound family, not the only sound."""
    clip = synth_clip(rng, sample_rate, seconds, kinds=kinds[:1], n_events=(1, 2), noise_db=(-45, -20))
    n = len(clip)
    extra = [(k, 0.0) for k in kinds[1:]]
    if distractors and rng.random() < 0.5:
        extra.append((str(rng.choice(distractors)), rng.uniform(-25, -12)))
    for kind, gain_db in extra:
        event = synth_event(kind, rng, sample_rate, rng.uniform(0.2, max(0.21, seconds)))[:n]
        start = int(rng.integers(0, max(1, n - len(event) + 1)))
        clip[start:start + len(event)] += 0.9 * event * 10 ** (gain_db / 20)
    return (0.9 * clip / (np.abs(clip).max() + 1e-9)).astype(np.float32)


def write_labelled_task(dst: Union[str, Path] = 'data/demo_task', seed: int = 0,
                        n_per_class: tuple[int, int, int] = (60, 15, 30), seconds: float = 2.0,
                        kinds: tuple[str, ...] = EVENT_KINDS, sample_rate: int = 16000,
                        multi_label: bool = False, folds: int = 0) -> Path:
    """Write a labelled demo task in EVAR format; return the metadata CSV path (dst/metadata.csv).

    One class per sound family in `kinds` (8 by default). Clips are `seconds` long, 16 kHz mono wavs
    below dst/audio; the CSV has `file_name` (relative to dst/audio), `label` and `split`
    (train/valid/test, n_per_class of each per class). multi_label: each clip holds 1-3 families and
    `label` lists them comma-separated. folds > 0: a `fold` column (1..folds) instead of `split`,
    with sum(n_per_class) clips per class spread evenly over the folds.
    """
    import pandas as pd  # only the task writer needs pandas
    rng = np.random.default_rng(seed)
    dst = Path(dst)
    rows = []
    for split, count in zip(SPLITS, n_per_class):
        for i in range(count * len(kinds)):
            if multi_label:
                labels = [str(k) for k in rng.choice(kinds, size=int(rng.integers(1, 4)), replace=False)]
            else:
                labels = [kinds[i % len(kinds)]]
            others = tuple(k for k in EVENT_KINDS if k not in labels)
            clip = _labelled_clip(rng, tuple(labels), sample_rate, seconds, () if multi_label else others)
            name = f'{split}/{split}{i:04d}.wav'
            (dst / 'audio' / split).mkdir(parents=True, exist_ok=True)
            sf.write(dst / 'audio' / name, clip, sample_rate)
            rows.append(dict(file_name=name, label=','.join(sorted(labels)), split=split))
    df = pd.DataFrame(rows)
    if folds:
        df = df.drop(columns='split')
        df['fold'] = df.groupby('label').cumcount() % folds + 1
    path = dst / 'metadata.csv'
    df.to_csv(path, index=False)
    return path
