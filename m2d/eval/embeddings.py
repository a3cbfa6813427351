"""Clip embeddings: fixed-length clips -> LMS -> normalised -> M2D layer features -> pooled over time, cached on disk.

The cache key covers the weight file (path, size, mtime), the task metadata (path, size, mtime), the
clip length and every option that changes the numbers, so a retrained checkpoint or edited task is
never served stale embeddings.
"""
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from m2d.audio.io import load_audio
from m2d.audio.lms import RunningMeanStd
from m2d.device import resolve_device
from m2d.errors import OutputError, UsageError
from m2d.eval.tasks import TaskData
from m2d.runtime.runtime import RuntimeM2D
from util.atomic import remove_stale_temp_files, save_npy_atomic

CACHE_ENV = 'M2D_EVAL_CACHE'
DEFAULT_CACHE = Path('work') / 'eval_cache'
MAX_NORM_CLIPS = 5000  # as EVAR's calculate_norm_stats
# 'mean': the time mean, as published (EVAR, HEAR scene embeddings). 'mean+std': the time mean and the
# time std side by side (statistics pooling), the same pooling the log-mel mean/std baseline gets.
POOLINGS = ('mean', 'mean+std')


def check_weight(weight: Union[str, Path], model: str = '', input_size=None) -> None:
    """A checkpoint file that exists, or 'random' with the model and input size to build."""
    if str(weight) == 'random':
        if not (model and input_size):
            raise UsageError("weight 'random' needs --model and --input_size, "
                             'e.g. --model m2d_vit_base --input_size 80x608')
    elif not Path(weight).is_file():
        raise UsageError(f'weight file not found: {weight}')


def make_runtime(weight: Union[str, Path], device: Optional[Union[str, torch.device]] = 'auto', seed: int = 0,
                 model: str = '', input_size=None, patch_size=None, **settings) -> RuntimeM2D:
    """RuntimeM2D for a checkpoint path, or for 'random' weights of `model` (seeded) at input_size/patch_size."""
    check_weight(weight, model, input_size)
    weight = str(weight)
    if weight == 'random':
        patch_size = patch_size or [16, 16]
    torch.manual_seed(seed)
    runtime = RuntimeM2D(weight_file=weight, model=model, input_size=input_size or None,
                         patch_size=patch_size or None, **settings)
    return runtime.to(device if isinstance(device, torch.device) else resolve_device(device))


def check_layers(runtime: RuntimeM2D, output_layers: Sequence[int]) -> list[int]:
    depth = len(runtime.backbone.blocks)
    layers = [int(i) for i in output_layers]
    bad = [i for i in layers if not -depth <= i < depth]
    if not layers or bad:
        raise UsageError(f'output_layers {layers}: the model has {depth} blocks; '
                         f'use indices in [-{depth}, {depth - 1}]')
    return layers


def layer_features(runtime: RuntimeM2D, lms: torch.Tensor, output_layers: Sequence[int] = (-1,)) -> torch.Tensor:
    """Normalised LMS [B, 1, F, T] -> frame features of the chosen blocks, concatenated:
    [B, T', D' * len(output_layers)].

    [-1] is the final output (after the last norm); other indices are block outputs (see encode_lms).
    """
    layers = check_layers(runtime, output_layers)
    if layers == [-1]:
        return runtime.encode_lms(lms)
    per_layer = runtime.encode_lms(lms, return_layers=True)
    return torch.cat([per_layer[i] for i in layers], dim=-1)


def fix_length(wav: torch.Tensor, samples: int, start: int = 0) -> torch.Tensor:
    """Crop [..., S] to `samples` from `start`, or right-pad it with zeros."""
    wav = wav[..., start:start + samples]
    return F.pad(wav, (0, samples - wav.shape[-1]))


class ClipDataset(torch.utils.data.Dataset):
    """Audio files -> mono clips at `sample_rate` (the runtime's: 32 kHz for p32k weights) of exactly
    `samples` samples (from the start; zero-padded). With labels, items are (clip [samples], label);
    random_crop picks a random start in longer files."""

    def __init__(self, files: Sequence[Path], samples: int, labels: Optional[np.ndarray] = None,
                 random_crop: bool = False, *, sample_rate: int):
        self.files, self.samples, self.labels = list(files), samples, labels
        self.random_crop, self.sample_rate = random_crop, sample_rate

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        wav = torch.from_numpy(load_audio(self.files[index], self.sample_rate))
        extra = wav.shape[-1] - self.samples
        start = int(torch.randint(extra + 1, ())) if self.random_crop and extra > 0 else 0
        clip = fix_length(wav, self.samples, start)
        return clip if self.labels is None else (clip, torch.as_tensor(self.labels[index]))


def clip_loader(files: Sequence[Path], seconds: float, batch_size: int, num_workers: int = 0, *,
                sample_rate: int) -> torch.utils.data.DataLoader:
    """Clips [batch_size, seconds * sample_rate] of the files, in order."""
    dataset = ClipDataset(files, int(round(seconds * sample_rate)), sample_rate=sample_rate)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)


def norm_stats(runtime: RuntimeM2D, loader, max_clips: int = MAX_NORM_CLIPS) -> tuple[float, float]:
    """Mean and std of all LMS values of (up to max_clips) clips: the dataset normalisation stats."""
    stats = RunningMeanStd()
    seen = 0
    with torch.inference_mode():
        for batch in tqdm(loader, desc='norm stats', leave=False):
            batch = batch[0] if isinstance(batch, (list, tuple)) else batch
            stats.add(runtime.to_feature(batch))
            seen += len(batch)
            if seen >= max_clips:
                break
    return stats.mean, stats.std


def normalize(runtime: RuntimeM2D, lms: torch.Tensor, stats: Optional[tuple[float, float]]) -> torch.Tensor:
    """Dataset stats (mean, std) when given, else the batch's own (RuntimeM2D.normalize_batch)."""
    if stats is None:
        return runtime.normalize_batch(lms)
    return (lms - stats[0]) / (stats[1] + torch.finfo(torch.float32).eps)


def check_pooling(pooling: str) -> None:
    if pooling not in POOLINGS:
        raise UsageError(f'pooling {pooling!r}: use one of {", ".join(POOLINGS)}')


def pool(frames: torch.Tensor, pooling: str = 'mean') -> torch.Tensor:
    """Frame features [B, T', D] -> clip embeddings [B, D] ('mean') or [B, 2D] ('mean+std': mean, then std)."""
    check_pooling(pooling)
    if pooling == 'mean':
        return frames.mean(dim=1)
    # The population std: defined for a one-frame clip too.
    return torch.cat([frames.mean(dim=1), frames.std(dim=1, correction=0)], dim=-1)


def extract(runtime: RuntimeM2D, loader, output_layers: Sequence[int] = (-1,),
            stats: Optional[tuple[float, float]] = None, desc: str = 'embeddings', pooling: str = 'mean') -> np.ndarray:
    """Clips -> clip embeddings [N, D' * len(output_layers)], or twice that for 'mean+std' (pool of layer_features)."""
    runtime.eval()
    out = []
    for batch in tqdm(loader, desc=desc, leave=False):
        lms = normalize(runtime, runtime.to_feature(batch), stats)
        out.append(pool(layer_features(runtime, lms, output_layers), pooling).cpu().numpy())
    return np.concatenate(out).astype(np.float32)


def _file_id(path: Union[str, Path]) -> list:
    path = Path(path).resolve()
    st = path.stat()
    return [str(path), st.st_size, st.st_mtime_ns]


def cache_key(weight: str, task: TaskData, options: dict) -> str:
    weight_id = ['random'] if str(weight) == 'random' else _file_id(weight)
    ident = dict(weight=weight_id, metadata=_file_id(task.spec.metadata),
                 audio_root=str(task.spec.audio_root.resolve()), seconds=task.spec.seconds, **options)
    return hashlib.sha1(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]


def task_embeddings(weight: Union[str, Path], task: TaskData, output_layers: Sequence[int] = (-1,),
                    dataset_norm: bool = True, batch_size: int = 64, num_workers: int = 0, seed: int = 0,
                    device: Optional[str] = 'auto', cache_dir: Optional[Union[str, Path]] = None,
                    runtime_settings: Optional[dict] = None, pooling: str = 'mean') -> tuple[np.ndarray, bool]:
    """Embeddings [N, D'] of every clip of a task (metadata order) and whether they came from the cache.

    dataset_norm: normalise LMS with the mean/std of the training clips (EVAR's way; all clips for fold
    tasks), else each batch with its own stats (RuntimeM2D.encode's way, which depends on batch_size).
    Weights that store fixed stats (later formats) are normalised with those either way.
    cache_dir: default $M2D_EVAL_CACHE or work/eval_cache; '' disables the cache.
    pooling: 'mean' (published) or 'mean+std' over time, see POOLINGS.
    """
    runtime_settings = dict(runtime_settings or {})
    check_weight(weight, runtime_settings.get('model', ''), runtime_settings.get('input_size'))
    check_pooling(pooling)
    options = dict(output_layers=[int(i) for i in output_layers], dataset_norm=dataset_norm,
                   batch_size=None if dataset_norm else batch_size, **runtime_settings)
    if pooling != 'mean':  # keeps the cache keys of published-pooling embeddings as they were
        options['pooling'] = pooling
    if str(weight) == 'random':
        options['seed'] = seed
    cache_dir = os.environ.get(CACHE_ENV, DEFAULT_CACHE) if cache_dir is None else cache_dir
    path = Path(cache_dir) / f'{task.spec.name}-{cache_key(str(weight), task, options)}.npy' if cache_dir else None
    if path is not None and path.is_file():
        emb = np.load(path)
        if len(emb) == len(task.files):
            return emb, True
    runtime = make_runtime(weight, device=device, seed=seed, **runtime_settings)
    check_layers(runtime, output_layers)
    stats = None
    if dataset_norm and runtime.norm_stats is None:  # later-format weights bring their own fixed stats
        stat_files = task.files if task.split is None else [f for f, s in zip(task.files, task.split) if s == 'train']
        stats = norm_stats(runtime, clip_loader(stat_files, task.spec.seconds, batch_size, num_workers,
                                                sample_rate=runtime.sample_rate))
    clips = clip_loader(task.files, task.spec.seconds, batch_size, num_workers, sample_rate=runtime.sample_rate)
    emb = extract(runtime, clips, output_layers, stats, desc=f'{task.spec.name} embeddings', pooling=pooling)
    if path is not None:
        remove_stale_temp_files(path.parent)  # what killed runs left there
        try:
            save_npy_atomic(emb, path)
        except OSError as e:  # a full or read-only cache costs time on the next run, not this result
            print(f'Note: embeddings not cached ({OutputError(path, e)})', file=sys.stderr)
    return emb, False
