"""Pre-training data: log-mel spectrogram (LMS) .npy files listed in a CSV.

The CSV has a `file_name` column with paths relative to the data folder; each file holds float32
(1, F, T). An item is a random crop of `crop_frames` frames (right zero-padded in log space when the
file is shorter), normalised with dataset statistics: (x - mean) / std.
"""
import argparse
import itertools
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from m2d.audio.lms import RunningMeanStd
from m2d.errors import UsageError
from m2d.filelist import PathLike, read_file_list
from util.atomic import open_atomic
from util.dist import DistInfo

if TYPE_CHECKING:
    from m2d.train.shard_set import ShardSet

NORM_STATS_CROPS = 10_000  # crops drawn to estimate the normalisation statistics
EPS = float(np.finfo(np.float32).eps)


def lms_problem(lms: np.ndarray, n_mels: int) -> Optional[str]:
    """Why `lms` is not a usable pre-training clip, a (1, n_mels, T) float array of finite values, or None
    (the rule for listed files and for clips packed into shards)."""
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


def _file_problem(path: Path, n_mels: int) -> Optional[str]:
    """Why `path` is not a usable LMS .npy (see lms_problem), or None. Memory-maps the file, which catches
    truncated data too."""
    try:
        lms = np.load(path, mmap_mode='r')
    except FileNotFoundError:
        return 'missing'
    except Exception as e:  # a truncated or non-npy file
        return f'unreadable ({type(e).__name__}: {e})'
    return lms_problem(lms, n_mels)


def checked_list_path(file_list: PathLike) -> Path:
    """Where check_files remembers the files of a list it found usable: `.NAME.checked.npz` beside it."""
    file_list = Path(file_list)
    return file_list.parent / f'.{file_list.name}.checked.npz'


def _stat(path: Path) -> Optional[tuple[int, int]]:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _load_checked(path: Path, root: Path, n_mels: int) -> dict[str, tuple[int, int]]:
    """{name: (size, mtime_ns)} of the files found usable before, under the same data folder and n_mels."""
    try:
        with np.load(path) as saved:
            if json.loads(saved['meta'].tobytes()) != {'data_path': str(root.resolve()), 'n_mels': n_mels}:
                return {}
            names = saved['names'].tobytes().decode().split('\n')
            return dict(zip(names, zip(saved['sizes'].tolist(), saved['mtimes'].tolist())))
    except (OSError, ValueError, KeyError):  # none yet, or unreadable: check everything
        return {}


def _save_checked(path: Path, root: Path, n_mels: int, usable: dict[str, tuple[int, int]]) -> None:
    names = list(usable)
    meta = json.dumps({'data_path': str(root.resolve()), 'n_mels': n_mels}).encode()
    try:
        with open_atomic(path) as f:
            np.savez(f, meta=np.frombuffer(meta, np.uint8), names=np.frombuffer('\n'.join(names).encode(), np.uint8),
                     sizes=np.array([usable[n][0] for n in names], np.int64),
                     mtimes=np.array([usable[n][1] for n in names], np.int64))
    except OSError as e:  # e.g. a read-only folder: the next start checks every file again
        print(f'Note: cannot remember the checked files in {path} ({e.strerror}); the next start reads them all again')


def check_files(files: Sequence[str], data_path: PathLike, n_mels: int, skip_missing: bool = False,
                workers: int = 16, remember: Optional[PathLike] = None) -> list[str]:
    """Verify that every listed file exists and is a (1, n_mels, T) float array of finite values, before training.

    Bad files raise a ValueError naming the first few and the count; with skip_missing they are
    dropped with a warning instead. Returns the usable files.

    remember: a file (checked_list_path) where the usable files are remembered with their size and
    modification time: a later check reads only the files that changed or are new, and stats the rest.
    """
    root = Path(data_path)
    known = _load_checked(Path(remember), root, n_mels) if remember else {}
    with ThreadPoolExecutor(workers) as pool:  # file opens are I/O bound; threads hide the latency
        stats = list(pool.map(lambda f: _stat(root / f), files))
        todo = [i for i, (f, st) in enumerate(zip(files, stats)) if st is not None and known.get(f) != st]
        found = dict(zip(todo, pool.map(lambda i: _file_problem(root / files[i], n_mels), todo)))
    problems = [found.get(i) if st is not None else 'missing' for i, st in enumerate(stats)]
    if remember and (todo or len(known) != len(files)):
        _save_checked(Path(remember), root, n_mels, {f: st for f, st, p in zip(files, stats, problems) if not p})
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
    """A random crop (1, F, crop_frames) of an LMS file (see random_crop_of), memory-mapped."""
    return random_crop_of(np.load(path, mmap_mode='r'), crop_frames, tile)


def random_crop_of(lms: np.ndarray, crop_frames: int, tile: bool = False) -> np.ndarray:
    """A random float32 crop (1, F, crop_frames) of an LMS (1, F, T), its start drawn as published: from
    numpy's global RNG, np.random.randint(T - crop_frames). Shorter inputs are right-padded with zeros,
    or with tile=True repeated until they fill the crop."""
    if tile and lms.shape[-1] < crop_frames:
        lms = np.tile(lms, (1, 1, -(-crop_frames // lms.shape[-1])))
    return crop_or_pad(lms, crop_start(lms.shape[-1], crop_frames), crop_frames)


def crop_start(frames: int, crop_frames: int) -> int:
    """The first frame of a random crop of an LMS of `frames` frames, drawn as published: from numpy's global
    RNG, np.random.randint(frames - crop_frames); 0 when the LMS is no longer than the crop."""
    excess = frames - crop_frames
    return np.random.randint(excess) if excess > 0 else 0


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


class ResumableSampler(DistributedSampler):
    """DistributedSampler that can start an epoch part-way: `skip` indices of its order left out."""
    skip = 0

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(super().__iter__(), self.skip, None)


def make_loader(config: argparse.Namespace, info: DistInfo, files: Union[list[str], 'ShardSet'], device: torch.device
                ) -> tuple[DataLoader, Callable[..., None]]:
    """The DataLoader of a settled run (config: its TrainConfig) and start_of_epoch(epoch, first_step=0), to
    call before each epoch (first_step: the steps of a resumed epoch already done). `files`: the listed
    files, or a ShardSet (--shards: m2d.train.shards).

    A seeded shuffle every epoch (the sampler's set_epoch), on one process too: the order depends only on
    --seed and the epoch. --published_data: sampler seed 0, a padded last batch, and on one process the
    epoch-1 order throughout, as published. Workers start afresh each epoch (not persistent), seeded from
    the main RNG, so a resume at an epoch's start stays exact (part-way, the order continues exactly, and
    the crops too with --num_workers 0).
    """
    # Imported here: both import this module (its crops).
    from m2d.train.shard_set import ShardSet
    from m2d.train.shards import make_shard_loader
    if isinstance(files, ShardSet):
        return make_shard_loader(config, info, files, device)
    dataset = SpectrogramDataset(files, config.data_path, config.input_size[1], config.norm_stats,
                                 background_noise(config, files))
    sampler = ResumableSampler(dataset, num_replicas=info.world_size, rank=info.rank, shuffle=True,
                               seed=0 if config.published_data else config.seed, drop_last=not config.published_data)
    loader = DataLoader(dataset, batch_size=config.batch_size, sampler=sampler, num_workers=config.num_workers,
                        pin_memory=config.pin_mem and device.type == 'cuda', drop_last=True)
    reshuffle = info.distributed or not config.published_data

    def start_of_epoch(epoch: int, first_step: int = 0) -> None:
        if reshuffle:
            sampler.set_epoch(epoch)
        sampler.skip = first_step * config.batch_size
        # The loader seeds its workers with a draw from torch's RNG when the epoch starts; a run resumed part-way
        # restored that RNG as it was after the draw: the draw comes from elsewhere, and the masks stay the same.
        loader.generator = torch.Generator() if first_step else None
    return loader, start_of_epoch
