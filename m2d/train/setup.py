"""Settling a run before it trains: what depends on the data, the machine and the run being resumed
(run folder, files or shards, normalisation statistics, batch size, workers, lr, seeds), decided once
into the run's final TrainConfig; then claiming the run folder."""
import contextlib
import os
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch

from m2d.checkpoint import check_norm_stats, run_name, saved_args
from m2d.errors import CheckpointError, M2DError, UsageError
from m2d.outputs import check_writable, writing
from m2d.train.config import NOTED_IF_NOT_RESUMED, PUBLISHED_BATCH_SIZE, PUBLISHED_NUM_WORKERS, TrainConfig
from m2d.train.console import ConsoleCopy
from m2d.train.data import (
    NORM_STATS_CROPS,
    check_files,
    checked_list_path,
    compute_norm_stats,
    published_norm_stats,
    read_file_list,
)
from m2d.train.fast import apply_fast, describe
from m2d.train.resume import seed_everything
from m2d.train.run_folder import check_ownership, in_use, move_aside, run_lock, unused_folder
from m2d.train.shard_set import ShardSet, open_shards
from util import dist as distutil
from util.atomic import remove_stale_temp_files
from util.cpu import idle_cores, usable_cores
from util.schedules import scaled_lr

PrintFn = Callable[[str], None]


def prepare_data(config: TrainConfig, out: Path, info: distutil.DistInfo, print_fn: PrintFn
                 ) -> tuple[Union[list[str], ShardSet], Optional[list[float]]]:
    """On rank 0: check that the run folder can be written and is this run's, check the listed files and
    settle the normalisation stats; then share them (or the error, so every rank stops with its message)."""
    payload = None
    if info.is_main:
        try:
            payload = (*_prepare_data(config, out, print_fn), None)
        except (M2DError, FileNotFoundError) as e:
            payload = (None, None, str(e))
    files, stats, error = distutil.broadcast_object(payload)
    if error:
        raise UsageError(error)
    return files, stats


def _prepare_data(config: TrainConfig, out: Path, print_fn: PrintFn
                  ) -> tuple[Union[list[str], ShardSet], Optional[list[float]]]:
    # Now, not after a data scan that may take minutes: the folder can be written, and is this run's to write.
    check_writable(out, folder=True)
    busy = in_use(out)
    if busy:
        raise UsageError(busy)
    check_ownership(out, Path(config.resume) if config.resume else None, config.overwrite)
    return load_data(config, print_fn)


def load_data(config: TrainConfig, print_fn: PrintFn) -> tuple[Union[list[str], ShardSet], Optional[list[float]]]:
    """The run's data, checked (the listed files, or the shard set of --shards), and its normalisation stats:
    --norm_stats, else the shard index's, else measured on random crops (None with --published_data: each
    process estimates its own in settle)."""
    if config.shards:
        return _prepare_shards(config, print_fn)
    files = check_files(read_file_list(config.dataset), config.data_path, config.input_size[0], config.skip_missing,
                        remember=checked_list_path(config.dataset))
    print_fn(f'Dataset: {len(files)} files from {config.dataset} (data folder {config.data_path})')
    if config.norm_stats is not None:
        print_fn(f'Normalisation stats: mean {config.norm_stats[0]}, std {config.norm_stats[1]}')
        return files, config.norm_stats
    if config.published_data:  # estimated on each process once seeded (settle)
        return files, None
    mean, std, n = compute_norm_stats(files, config.data_path, config.input_size[1], seed=config.seed)
    fewer = ' (every file once: there are fewer files than that)' if n < NORM_STATS_CROPS else ''
    print_fn(f'Normalisation stats from {n} random crops{fewer}: mean {mean:.4f}, std {std:.4f} '
             f'(pass --norm_stats "[{mean:.4f}, {std:.4f}]" to reuse them)')
    return files, [mean, std]


def _prepare_shards(config: TrainConfig, print_fn: PrintFn) -> tuple[ShardSet, list[float]]:
    shards = open_shards(config.shards, config.input_size[0])
    print_fn(f'Dataset: {len(shards)} clips in {len(shards.counts)} shards at {config.shards} '
             f'({shards.index["dtype"]})')
    stats = config.norm_stats or shards.norm_stats
    print_fn(f'Normalisation stats{"" if config.norm_stats else " (of every stored value, from the index)"}: '
             f'mean {stats[0]:.4f}, std {stats[1]:.4f}')
    return shards, stats


def resolve_resources(config: TrainConfig, info: distutil.DistInfo, device: torch.device, n_files: int,
                      print_fn: PrintFn) -> tuple[int, int]:
    """The defaults that depend on the data and the machine: -> (batch size, DataLoader workers); sets
    this process's torch threads."""
    per_process = n_files // info.world_size
    batch_size = config.batch_size
    if batch_size is None:
        batch_size = min(PUBLISHED_BATCH_SIZE, per_process)
        if 0 < batch_size < PUBLISHED_BATCH_SIZE:
            print_fn(f'Note: batch size {batch_size} per process, as {n_files} files make no batch of '
                     f'{PUBLISHED_BATCH_SIZE} for {info.world_size} process(es) (--batch_size sets it)')
    if per_process < max(batch_size, 1):
        raise UsageError(f'{n_files} files are too few for one batch of {max(batch_size, 1)} per process '
                         f'x {info.world_size} processes; lower --batch_size')
    local_processes = int(os.environ.get('LOCAL_WORLD_SIZE', 1))
    workers = config.num_workers
    if workers is None:  # on the CPU, worker processes would take cores from the compute threads
        workers = 0 if device.type == 'cpu' else min(PUBLISHED_NUM_WORKERS, usable_cores() // local_processes)
    # Auto: the idle cores on the CPU, unless the user set OMP_NUM_THREADS (torch's default follows it).
    auto_idle = device.type == 'cpu' and 'OMP_NUM_THREADS' not in os.environ
    threads = config.threads or (max(1, idle_cores() // local_processes) if auto_idle else 0)
    if threads:
        torch.set_num_threads(threads)
    print_fn(f'Batch {batch_size} per process, {workers} DataLoader workers, '
             f'{torch.get_num_threads()} torch threads per process{"" if config.threads else " (auto)"}')
    return batch_size, workers


def settle(config: TrainConfig, info: distutil.DistInfo, device: torch.device, checkpoint: Any,
           print_fn: PrintFn) -> tuple[TrainConfig, list[str]]:
    """Settle, once, what depends on the data, the machine and the run being resumed: --fast's settings, the
    run folder, the files, the normalisation stats, batch size, workers, world size and lr. Seeds this
    process's random generators last (seed + rank), as the published run does before building its data
    set and model.
    -> (the run's final config, which the loop reads and checkpoints store; its files)."""
    config = apply_fast(config, device)
    if getattr(config, 'fast', False):
        print_fn(describe(config, device))
    norm_stats = config.norm_stats
    stored_stats = saved_args(checkpoint).get('norm_stats') if checkpoint is not None else None
    if norm_stats is None and stored_stats is not None:  # the same normalisation as before the stop
        try:
            norm_stats = list(check_norm_stats(stored_stats, f"{config.resume}'s stored norm_stats"))
        except CheckpointError as e:
            raise UsageError(f'--resume: {e}') from None
    out = config.output_dir or (Path(config.resume).parent if config.resume else unused_folder(run_name(config)))
    out = Path(distutil.broadcast_object(str(out)))
    files, norm_stats = prepare_data(config.replace(norm_stats=norm_stats), out, info, print_fn)
    batch_size, workers = resolve_resources(config, info, device, len(files), print_fn)
    eff_batch = batch_size * config.accum_iter * info.world_size
    lr = config.lr if config.lr is not None else scaled_lr(config.blr, eff_batch)
    print_fn(f'Effective batch {eff_batch} = {batch_size} per process x {config.accum_iter} accumulation '
             f'x {info.world_size} processes; lr {lr:.3e} (blr {config.blr:.3e} x {eff_batch} / 256), '
             f'warm-up {config.warmup_epochs:g} of {config.epochs} epochs')
    if config.warmup_epochs >= config.epochs:
        print_fn(f'Note: the lr warm-up ({config.warmup_epochs:g} epochs) spans the whole run ({config.epochs} '
                 'epochs): the lr only rises and never decays; pass a smaller --warmup_epochs')
    seed_everything(config.seed + info.rank)
    if norm_stats is None:  # --published_data: each process estimates its own, from its seeded RNG
        norm_stats = list(published_norm_stats(files, config.data_path, config.input_size[1]))
        print_fn(f'Normalisation stats (published estimate, on each process) from {NORM_STATS_CROPS} crops drawn '
                 f'with replacement: mean {norm_stats[0]:.4f}, std {norm_stats[1]:.4f}')
    return config.replace(output_dir=str(out), norm_stats=norm_stats, batch_size=batch_size, num_workers=workers,
                          world_size=info.world_size, lr=lr, eff_batch_size=eff_batch), files


def claim_run_folder(config: TrainConfig, held: contextlib.ExitStack, console: ConsoleCopy,
                     print_fn: PrintFn) -> Optional[str]:
    """Make the run folder and lock it for as long as `held` lasts; move aside what --overwrite replaces;
    start the console copy. -> an error message (to share with the other ranks), or None."""
    out = Path(config.output_dir)
    try:
        with writing(out):
            out.mkdir(parents=True, exist_ok=True)
        held.enter_context(run_lock(out, print_fn))
        # Checked again under the lock: another run may have saved here since the first look.
        aside = move_aside(out, check_ownership(out, Path(config.resume) if config.resume else None, config.overwrite))
        console.open(out / 'console.txt')
        if aside is not None:
            print_fn(f'--overwrite: moved the earlier files into {aside}')
        remove_stale_temp_files(out)
    except M2DError as e:
        return str(e)
    return None


def note_settings_not_resumed(stored: dict, config: TrainConfig, print_fn: PrintFn) -> None:
    """Say which of the checkpoint's stored paths and run settings a resumed run does not take (see
    RESUMED_ARGS), where they differ from this run's."""
    skipped = [k for k in NOTED_IF_NOT_RESUMED if k in stored and stored[k] != getattr(config, k)]
    if skipped:
        print_fn(f'Note: not taken from {config.resume} (this command line and the defaults decide): '
                 + ', '.join(f'{k}={getattr(config, k)!r} (stored {stored[k]!r})' for k in skipped))
