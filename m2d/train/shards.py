"""Pre-training from shards (`m2d pack`, `--shards`): the index, the shard files, each rank's plan of an
epoch, and the DataLoader. See docs/data-at-scale.md.

Location: a local folder (read in place) or a URL that webdataset's gopen opens (file://, http(s)://,
gs://, ...; a `pipe:` command with `{}` where the file name goes): each shard is fetched whole into a
local cache the first time it is needed (and the next ones in the background), its SHA-256 checked on
the way.

Checks: at start, the index (format, LMS shape, dtype) and, for a local folder, every shard's presence
and size (one stat each). A shard's SHA-256 is checked the first time it is read and remembered (a marker
per shard in the cache, keyed by its path, size and modification time), so later starts and epochs trust
it; a mismatch stops the run with one line naming the shard.

An epoch: the shards in a seeded random order (seed, epoch), their clips cut into one contiguous block
per rank of whole batches (the remainder, fewer than world_size x batch_size clips, sits the epoch out),
each block shuffled within windows of SHUFFLE_SHARDS shards. So every clip is seen at most once per
epoch, all but the remainder exactly once, each rank reads only its own shards, and the order depends on
(seed, epoch, world size, batch size) only: not on the loader workers, so a run resumes mid-epoch
exactly. Crops are drawn as published, np.random.randint(T - crop_frames) from numpy's global RNG, which
is seeded for each batch from (seed, epoch, rank, batch), so a resumed run draws the same crops; only a
crop's frames are read (the clips are stored frame by frame).
"""
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from m2d.train.data import crop_or_pad
from m2d.train.shard_set import PREFETCH_BATCHES, SHUFFLE_SHARDS, ShardFiles, ShardSet
from util.dist import DistInfo

# ----- the plan of an epoch ---------------------------------------------------------------------

def epoch_batches(counts: np.ndarray, seed: int, epoch: int, world_size: int, rank: int, batch_size: int,
                  shuffle_shards: int = SHUFFLE_SHARDS) -> np.ndarray:
    """The sample numbers of rank `rank`'s batches in epoch `epoch`: [n_batches, batch_size].

    The shards in a random order of (seed, epoch), their clips concatenated and cut into world_size
    blocks of whole batches (the rest sits the epoch out), each block shuffled within windows of
    shuffle_shards (mean-sized) shards."""
    starts = np.concatenate([[0], np.cumsum(counts)])
    order = np.random.default_rng([seed, epoch]).permutation(len(counts))
    samples = np.concatenate([np.arange(starts[s], starts[s + 1]) for s in order])
    per_rank = len(samples) // (world_size * batch_size) * batch_size
    block = samples[rank * per_rank:(rank + 1) * per_rank].copy()
    window = max(1, int(round(shuffle_shards * counts.mean())))
    rng = np.random.default_rng([seed, epoch, rank])
    for start in range(0, per_rank, window):
        rng.shuffle(block[start:start + window])
    return block.reshape(-1, batch_size)


def crop_seed(seed: int, epoch: int, rank: int, batch: int) -> int:
    """The numpy seed of a batch's crops."""
    return int(np.random.SeedSequence([seed, epoch, rank, batch]).generate_state(1)[0])


class BatchNumbers(Sampler):
    """Yields [batch number] for the batches of an epoch from `first` on; len() = the whole epoch."""

    def __init__(self, n_batches: int):
        self.n_batches, self.first = n_batches, 0

    def __len__(self) -> int:
        return self.n_batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter([[b] for b in range(self.first, self.n_batches)])


class ShardDataset(Dataset):
    """Batches of normalised random crops [1, F, crop_frames] of a shard set, by batch number (see
    epoch_batches): a DataLoader fetches one batch per __getitems__([number])."""

    def __init__(self, shards: ShardSet, crop_frames: int, norm_stats: tuple[float, float], seed: int,
                 info: DistInfo, batch_size: int, cache: Optional[Path] = None, cache_limit: int = 0):
        self.shards, self.crop_frames, self.seed, self.info = shards, crop_frames, seed, info
        self.batch_size = batch_size
        self.mean, self.std = (float(v) for v in norm_stats)
        self.cache, self.cache_limit, self.epoch = cache, cache_limit, 0
        self._files: Optional[ShardFiles] = None
        self._plan: tuple[int, Optional[np.ndarray]] = (-1, None)

    @property
    def files(self) -> ShardFiles:  # opened in each process that reads (DataLoader workers)
        if self._files is None:
            self._files = ShardFiles(self.shards, self.cache, self.cache_limit)
        return self._files

    def plan(self) -> np.ndarray:
        if self._plan[0] != self.epoch:
            self._plan = (self.epoch, epoch_batches(self.shards.counts, self.seed, self.epoch, self.info.world_size,
                                                    self.info.rank, self.batch_size))
        return self._plan[1]

    def n_batches(self) -> int:
        return len(self.shards) // (self.info.world_size * self.batch_size)

    def __len__(self) -> int:
        return self.n_batches()

    def __getitem__(self, batch: int) -> torch.Tensor:
        return torch.stack(self.__getitems__([batch]))

    def crops(self, batch: int) -> list[tuple[int, int, int]]:
        """(sample, start, frames to read) of batch `batch`'s crops, numpy's global RNG seeded for the batch."""
        np.random.seed(crop_seed(self.seed, self.epoch, self.info.rank, batch))
        return [(int(s), *self.files.crop(int(s), self.crop_frames)) for s in self.plan()[batch]]

    def __getitems__(self, batches: list[int]) -> list[torch.Tensor]:
        (batch,) = batches
        plan = self.plan()
        if self.shards.remote:
            upcoming = plan[batch + 1:batch + 1 + PREFETCH_BATCHES].ravel()[::max(1, self.batch_size // 4)]
            self.files.prefetch([self.shards.shard_of(int(s)) for s in upcoming])
        crops = self.crops(batch)
        if batch + 1 < len(plan):  # the next batch's crops (the same draws then): read while this one is made
            self.files.read_ahead(self.crops(batch + 1))
        return [(torch.from_numpy(crop_or_pad(self.files.read(*crop), 0, self.crop_frames)) - self.mean) / self.std
                for crop in crops]


def make_shard_loader(config: Any, info: DistInfo, shards: ShardSet, device: torch.device
                      ) -> tuple[DataLoader, Callable[[int, int], None]]:
    """The DataLoader of a run on shards and start_of_epoch(epoch, first_step). The loader draws nothing
    from torch's global RNG (its own generator), so the masks of a resumed run are those it would have drawn."""
    dataset = ShardDataset(shards, config.input_size[1], config.norm_stats, config.seed, info, config.batch_size,
                           Path(config.shard_cache) if config.shard_cache else None,
                           int(getattr(config, 'shard_cache_gb', 0) * 1e9))
    batches = BatchNumbers(dataset.n_batches())
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=config.num_workers,
                        pin_memory=config.pin_mem and device.type == 'cuda', generator=torch.Generator(),
                        collate_fn=torch.stack)

    def start_of_epoch(epoch: int, first_step: int = 0) -> None:
        dataset.epoch, batches.first = epoch, first_step
    return loader, start_of_epoch
