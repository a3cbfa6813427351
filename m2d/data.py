"""Pre-training data: log-mel spectrogram (LMS) .npy files listed in a CSV.

The CSV has a `file_name` column with paths relative to the data folder; each file holds float32
(1, F, T). An item is a random crop of `crop_frames` frames (right zero-padded in log space when the
file is shorter), normalised with dataset statistics: (x - mean) / std.
"""
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from .lms import RunningMeanStd

PathLike = Union[str, Path]
NORM_STATS_CROPS = 10_000  # crops drawn to estimate the normalisation statistics
EPS = float(np.finfo(np.float32).eps)


def read_table(path: PathLike, what: str = 'CSV', **read_csv_kwargs) -> pd.DataFrame:
    """pd.read_csv with one-line errors that name the file (missing, empty, not a CSV). Only empty
    fields are missing values (NaN): a name or label such as 'NA' or 'None' stays a string."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'{what} not found: {path}')
    try:
        return pd.read_csv(path, keep_default_na=False, na_values=[''], **read_csv_kwargs)
    except pd.errors.EmptyDataError:
        raise ValueError(f'{what} {path} is empty; it needs a header line, then one row per file') from None
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise ValueError(f'{what} {path} is not a readable CSV file ({str(e).strip()})') from None


def leaves_folder(name: str) -> bool:
    """Whether a relative path from a file list points outside its base folder: absolute, or climbing
    out with '..'. Compared as written (lexically), so symlinks inside the folder may point anywhere."""
    return os.path.isabs(name) or os.path.normpath(name).split(os.sep)[0] == os.pardir


def check_relative(names: Sequence[str], lines: Sequence[int], listing: PathLike, base_option: str) -> None:
    """Raise ValueError naming the first few `names` (at `lines` of the `listing` file) that leave their
    base folder (see leaves_folder); `base_option` is the option that sets that folder."""
    bad = [(n, line) for n, line in zip(names, lines) if leaves_folder(str(n))]
    if bad:
        shown = ', '.join(f'line {line}: {n}' for n, line in bad[:5]) + (', ...' if len(bad) > 5 else '')
        raise ValueError(f'{listing}: {len(bad)} file names point outside {base_option} (absolute or with ..): '
                         f'{shown}. List paths relative to {base_option}, or set {base_option} to a folder '
                         f'that holds them all')


def read_file_list(path: PathLike, what: str = 'dataset CSV', base_option: str = '--data_path') -> list[str]:
    """The sorted file names of a list: a CSV's `file_name` column, or (for other suffixes, e.g. .txt)
    one name per line. Names are paths relative to the folder `base_option` sets; names that leave it
    are rejected (check_relative)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}. It lists paths relative to {base_option}: a CSV with a "
                                "'file_name' column, or a text file with one path per line (see README)")
    if path.suffix.lower() == '.csv':
        df = read_table(path, what)
        if 'file_name' not in df.columns:
            raise ValueError(f"{path} has no 'file_name' column (columns: {list(df.columns)}); the first line "
                             f"must be the header 'file_name', then one path per line, relative to {base_option}")
        rows = [(str(f), i + 2) for i, f in enumerate(df['file_name']) if not pd.isna(f)]  # line 1: the header
    else:
        rows = [(line.strip(), n) for n, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    if not rows:
        raise ValueError(f'{path} lists no files')
    check_relative([f for f, _ in rows], [line for _, line in rows], path, base_option)
    return sorted(f for f, _ in rows)


def _file_problem(path: Path, n_mels: int) -> Optional[str]:
    """Why `path` is not a usable (1, n_mels, T) float .npy of finite values, or None. Memory-maps the
    file, which catches truncated data too."""
    try:
        lms = np.load(path, mmap_mode='r')
    except FileNotFoundError:
        return 'missing'
    except Exception as e:  # a truncated or non-npy file
        return f'unreadable ({type(e).__name__}: {e})'
    if lms.ndim != 3 or lms.shape[:2] != (1, n_mels) or lms.shape[2] < 1:
        return f'shape {lms.shape}, expected (1, {n_mels}, T)'
    if lms.dtype.kind != 'f':
        return f'dtype {lms.dtype}, expected float'
    # Reads every value: one NaN/inf makes the normalisation stats or a loss NaN, maybe hours later. The sum
    # is the fast test; values are counted only when it is not finite (huge finite values can overflow it).
    with np.errstate(over='ignore', invalid='ignore'):
        total = lms.sum()
    if not np.isfinite(total):
        bad = int(np.count_nonzero(~np.isfinite(lms)))
        if bad:
            return f'holds {bad} NaN/inf values'
    return None


def check_files(files: Sequence[str], data_path: PathLike, n_mels: int, skip_missing: bool = False,
                workers: int = 16) -> list[str]:
    """Verify that every listed file exists and is a (1, n_mels, T) float array of finite values, before training.

    Bad files raise a ValueError naming the first few and the count; with skip_missing they are
    dropped with a warning instead. Returns the usable files.
    """
    root = Path(data_path)
    with ThreadPoolExecutor(workers) as pool:  # file opens are I/O bound; threads hide the latency
        problems = list(pool.map(lambda f: _file_problem(root / f, n_mels), files))
    bad = [(f, p) for f, p in zip(files, problems) if p]
    if not bad:
        return list(files)
    listing = '\n'.join(f'  {root / f}: {p}' for f, p in bad[:5]) + ('\n  ...' if len(bad) > 5 else '')
    summary = f'{len(bad)} of {len(files)} files listed in the dataset CSV are missing or unusable:\n{listing}'
    if not skip_missing:
        raise ValueError(f'{summary}\nFix the files or the CSV, or pass --skip_missing to train without them.')
    kept = [f for f, p in zip(files, problems) if not p]
    if not kept:
        raise ValueError(f'{summary}\nNo usable files remain.')
    print(f'WARNING: skipping {summary}')
    return kept


def crop_or_pad(lms: np.ndarray, start: int, crop_frames: int) -> np.ndarray:
    """(1, F, T) -> (1, F, crop_frames) from `start`; shorter inputs are right-padded with zeros."""
    x = np.array(lms[..., start:start + crop_frames], dtype=np.float32)  # a copy: mmap slices are read-only
    if x.shape[-1] < crop_frames:
        x = np.pad(x, ((0, 0), (0, 0), (0, crop_frames - x.shape[-1])))
    return x


def published_norm_stats(files: Sequence[str], data_path: PathLike, crop_frames: int,
                         n_crops: int = NORM_STATS_CROPS) -> tuple[float, float]:
    """The published implementation's estimate: n_crops random crops (random_crop) of files drawn with
    replacement, both from numpy's global RNG, which moves as in a published run; -> (mean, unbiased
    std + eps) over every value (here accumulated in float64; the published code used float32 torch ops)."""
    picks = np.random.randint(0, len(files), size=n_crops)
    stats = RunningMeanStd()
    for pick in picks:
        stats.add(random_crop(Path(data_path) / files[pick], crop_frames))
    return stats.mean, stats.sample_std + EPS


def compute_norm_stats(files: Sequence[str], data_path: PathLike, crop_frames: int,
                       n_crops: int = NORM_STATS_CROPS, seed: int = 0, workers: int = 16) -> tuple[float, float, int]:
    """Mean and std (+eps) over up to n_crops random unnormalised crops (one per drawn file).

    Draws from its own generator, so it does not move the training RNG. -> (mean, std, crops used).
    """
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(files), size=min(n_crops, len(files)), replace=False)
    positions = rng.random(len(picks))  # where each crop starts, as a fraction of the room there is

    def crop(pick: int, position: float) -> np.ndarray:
        lms = np.load(Path(data_path) / files[pick], mmap_mode='r')
        excess = lms.shape[-1] - crop_frames
        return crop_or_pad(lms, int(position * excess) if excess > 0 else 0, crop_frames)

    stats = RunningMeanStd()
    with ThreadPoolExecutor(workers) as pool:  # file reads are I/O bound
        for x in pool.map(crop, picks, positions):
            stats.add(x)
    return stats.mean, stats.std + EPS, len(picks)


class SpectrogramDataset(Dataset):
    """Random crops of LMS files -> normalised tensors [1, F, crop_frames].

    Files are memory-mapped, so only the cropped frames are read. The crop start is drawn from numpy's
    global RNG, as published (seeded per DataLoader worker by torch), so runs reproduce under a fixed seed.

    With `noise` (a BackgroundNoise), each crop is mixed with a random background crop first (the
    later M2D's background-noise mixing, a regulariser for small data; see BackgroundNoise.mix).
    """

    def __init__(self, files: Sequence[str], data_path: PathLike, crop_frames: int,
                 norm_stats: tuple[float, float], noise: Optional['BackgroundNoise'] = None):
        self.files = list(files)
        self.data_path = Path(data_path)
        self.crop_frames = crop_frames
        self.mean, self.std = (float(v) for v in norm_stats)
        self.noise = noise

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        x = torch.from_numpy(random_crop(self.data_path / self.files[index], self.crop_frames))
        if self.noise is not None:
            return self.noise.mix(x, self.mean) / self.std
        return (x - self.mean) / self.std


def random_crop(path: PathLike, crop_frames: int, tile: bool = False) -> np.ndarray:
    """A random crop (1, F, crop_frames) of an LMS file, its start drawn as published: from numpy's
    global RNG, np.random.randint(T - crop_frames). Shorter files are right-padded with zeros, or with
    tile=True repeated until they fill the crop."""
    lms = np.load(path, mmap_mode='r')
    if tile and lms.shape[-1] < crop_frames:
        lms = np.tile(lms, (1, 1, -(-crop_frames // lms.shape[-1])))
    excess = lms.shape[-1] - crop_frames
    start = np.random.randint(excess) if excess > 0 else 0
    return crop_or_pad(lms, start, crop_frames)


class BackgroundNoise:
    """Background crops mixed into training crops at a fixed power ratio (the later M2D's noise mixing).

    mix(x, mean) = log(ratio * exp(noise - noise_mean) + (1 - ratio) * exp(x - mean)): both are first
    brought to the same average level (log-mean subtraction), then added as mel power, so the ratio
    is the share of the background in the mixture. Background files shorter than a crop are repeated.
    """

    def __init__(self, files: Sequence[str], data_path: PathLike, crop_frames: int, ratio: float,
                 noise_mean: float):
        if not 0 < ratio < 1:
            raise ValueError(f'noise ratio must be between 0 and 1 (exclusive), got {ratio}')
        self.files, self.data_path, self.crop_frames = list(files), Path(data_path), crop_frames
        self.ratio, self.noise_mean = float(ratio), float(noise_mean)

    def mix(self, x: torch.Tensor, mean: float) -> torch.Tensor:
        """Unnormalised LMS crop [1, F, T] -> the mixture, log-mean-subtracted (divide by std to normalise)."""
        pick = int(torch.randint(len(self.files), ()))
        noise = torch.from_numpy(random_crop(self.data_path / self.files[pick], self.crop_frames, tile=True))
        power = self.ratio * (noise - self.noise_mean).exp() + (1 - self.ratio) * (x - mean).exp()
        return power.clamp_min(EPS).log()


def load_vis_samples(folder: PathLike, crop_frames: int, norm_stats: tuple[float, float],
                     max_samples: int = 4) -> tuple[list[str], Optional[torch.Tensor]]:
    """The first frames of up to max_samples `folder/*.npy` files, normalised: (names, [B, 1, F, crop])."""
    paths = sorted(Path(folder).glob('*.npy'))[:max_samples]
    if not paths:
        return [], None
    mean, std = norm_stats
    arrays = [np.load(p, mmap_mode='r') for p in paths]
    x = np.stack([crop_or_pad(a.reshape(1, -1, a.shape[-1]), 0, crop_frames) for a in arrays])  # (F, T) too
    return [p.stem for p in paths], (torch.from_numpy(x) - mean) / std
