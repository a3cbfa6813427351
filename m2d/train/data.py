"""Pre-training data: log-mel spectrogram (LMS) .npy files listed in a CSV.

The CSV has a `file_name` column with paths relative to the data folder; each file holds float32
(1, F, T). An item is a random crop of `crop_frames` frames (right zero-padded in log space when the
file is shorter), normalised with dataset statistics: (x - mean) / std.
"""
import argparse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from m2d.audio.lms import RunningMeanStd
from m2d.errors import UsageError
from m2d.filelist import PathLike, read_file_list
from util.dist import DistInfo

NORM_STATS_CROPS = 10_000  # crops drawn to estimate the normalisation statistics
EPS = float(np.finfo(np.float32).eps)


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
        raise UsageError(f'{summary}\nFix the files or the CSV, or pass --skip_missing to train without them.')
    kept = [f for f, p in zip(files, problems) if not p]
    if not kept:
        raise UsageError(f'{summary}\nNo usable files remain.')
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
            raise UsageError(f'noise ratio must be between 0 and 1 (exclusive), got {ratio}')
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


def background_noise(config: argparse.Namespace, files: list[str]) -> Optional[BackgroundNoise]:
    """The --noise_ratio mixer: background crops from --csv_bg_noise, else from the training files."""
    if config.noise_ratio <= 0:
        return None
    if not config.csv_bg_noise:
        return BackgroundNoise(files, config.data_path, config.input_size[1], config.noise_ratio, config.norm_stats[0])
    bg_files = check_files(read_file_list(config.csv_bg_noise), config.data_path, config.input_size[0],
                           config.skip_missing)
    bg_mean = compute_norm_stats(bg_files, config.data_path, config.input_size[1], seed=config.seed)[0]
    return BackgroundNoise(bg_files, config.data_path, config.input_size[1], config.noise_ratio, bg_mean)


def make_loader(config: argparse.Namespace, info: DistInfo, files: list[str], device: torch.device
                ) -> tuple[DataLoader, Callable[[int], None]]:
    """The DataLoader of a settled run (config: its TrainConfig) and what to call at the start of each epoch.

    A seeded shuffle every epoch (the sampler's set_epoch), on one process too: the order depends only on
    --seed and the epoch. --published_data: sampler seed 0, a padded last batch, and on one process the
    epoch-1 order throughout, as published. Workers start afresh each epoch (not persistent), seeded from
    the main RNG, so a resume stays exact.
    """
    dataset = SpectrogramDataset(files, config.data_path, config.input_size[1], config.norm_stats,
                                 background_noise(config, files))
    sampler = DistributedSampler(dataset, num_replicas=info.world_size, rank=info.rank, shuffle=True,
                                 seed=0 if config.published_data else config.seed, drop_last=not config.published_data)
    loader = DataLoader(dataset, batch_size=config.batch_size, sampler=sampler, num_workers=config.num_workers,
                        pin_memory=config.pin_mem and device.type == 'cuda', drop_last=True)
    reshuffle = info.distributed or not config.published_data
    return loader, (sampler.set_epoch if reshuffle else lambda epoch: None)
