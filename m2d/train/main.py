"""Pre-training driver behind train_audio.py (M2D; also `m2d train`) and mae_train_audio.py (MSM-MAE).

    python train_audio.py --dataset data/files_audioset.csv            # one process
    torchrun --nproc_per_node 4 train_audio.py --dataset ...           # DDP, 4 GPUs

A run: resolve the flags (m2d.train.config), settle what depends on the data and the machine (settle),
claim the run folder, then train (the epoch loop of m2d.train.engine), saving checkpoints and starting
the evaluation hooks. The folder (`{model}-{F}x{T}p{pf}x{pt}-{YYMMDD}-mr{ratio}` unless --output_dir is
given) holds checkpoint-{epoch}.pth, log.txt (a JSON line per epoch), console.txt (a copy of stdout),
TensorBoard events, loss.png, vis-{epoch}.png, and the logs of the evaluations it starts.
"""
import argparse
import contextlib
import datetime
import errno
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
import torch.nn as nn
from timm.optim import param_groups_weight_decay
from torch.nn.parallel import DistributedDataParallel
from torch.utils.tensorboard import SummaryWriter

from m2d.checkpoint import check_norm_stats, load_checkpoint, model_state, run_name, save_checkpoint, saved_args
from m2d.device import resolve_device
from m2d.errors import CheckpointError, Interrupted, M2DError, NonFiniteLossError, OutputError, ShardError, UsageError
from m2d.outputs import check_writable, writing
from m2d.train import hooks
from m2d.train.config import (
    NOTED_IF_NOT_RESUMED,
    PUBLISHED_BATCH_SIZE,
    PUBLISHED_NUM_WORKERS,
    TrainConfig,
    build_model,
    validate_args,
)
from m2d.train.console import ConsoleCopy, console_copy
from m2d.train.data import (
    NORM_STATS_CROPS,
    check_files,
    checked_list_path,
    compute_norm_stats,
    load_vis_samples,
    make_loader,
    published_norm_stats,
    read_file_list,
)
from m2d.train.engine import Precision, RunClock, Schedule, train_one_epoch
from m2d.train.fast import apply_fast, compile_blocks, describe
from m2d.train.plots import save_loss_curve, save_mask_figure
from m2d.train.resume import load_initial_weights, resume_from, resume_hint, rng_state, seed_everything
from m2d.train.run_folder import (
    STEP_CHECKPOINT,
    check_ownership,
    in_use,
    move_aside,
    run_lock,
    truncate_log,
    unused_folder,
)
from m2d.train.shards import ShardSet, open_shards
from util import dist as distutil
from util.atomic import remove_stale_temp_files, save_atomic
from util.cpu import idle_cores, usable_cores
from util.schedules import scaled_lr

PrintFn = Callable[[str], None]


@dataclass
class RunResult:
    output_dir: Path
    model: nn.Module
    last_checkpoint: Optional[Path] = None
    eval_processes: list = field(default_factory=list)


# ----- settling the run ----------------------------------------------------------------------------

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
    """Settle, once, what depends on the data, the machine and the run being resumed: the run folder, the
    files, the normalisation stats, batch size, workers, world size and lr. Seeds this process's random
    generators last (seed + rank), as the published run does before building its data set and model.
    -> (the run's final config, which the loop reads and checkpoints store; its files)."""
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


# ----- the run -------------------------------------------------------------------------------------

def build_optimizer(config: TrainConfig, model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """AdamW (0.9, 0.95) or SGD; no weight decay on biases and 1-D parameters (timm's rule)."""
    groups = param_groups_weight_decay(model, config.weight_decay)
    if config.optim == 'sgd':
        return torch.optim.SGD(groups, lr=config.lr, momentum=0.9)
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95), fused=device.type == 'cuda')


def save_initial_checkpoint(config: argparse.Namespace, path: Path) -> Path:
    """The weights a one-process run with `config` starts from (seeded with --seed, then built, as the run
    does), with its settings, as a checkpoint RuntimeM2D and the evaluator read (a random-init baseline)."""
    seed_everything(config.seed)
    return save_atomic({'model': model_state(build_model(config), config.norm_stats),
                        'args': argparse.Namespace(**vars(config))}, path)


def main(args: argparse.Namespace, script_dir: Optional[Path] = None) -> RunResult:
    """Pre-train as `args` (a TrainConfig, or the Namespace of get_args_parser) say. script_dir: where the
    training script's quick_eval.sh / all_eval.sh live, used unless --eval_scripts is given (see hooks).

    Raises UsageError for bad arguments or data, NonFiniteLossError if the loss diverges.
    """
    config = args if isinstance(args, TrainConfig) else TrainConfig(**vars(args))
    info = distutil.init_distributed(config.device, config.dist_url)
    try:
        return _main(config, info, config.eval_scripts or (str(script_dir) if script_dir else ''))
    finally:
        distutil.cleanup()


def _main(config: TrainConfig, info: distutil.DistInfo, scripts: str) -> RunResult:
    validate_args(config)
    device = resolve_device(config.device, info.local_rank)
    config = apply_fast(config, device)
    print_fn = print if info.is_main else (lambda *_: None)
    checkpoint = None
    if config.resume:
        try:
            checkpoint = load_checkpoint(config.resume, trust=config.trust_checkpoint)
        except M2DError as e:
            raise UsageError(f'--resume: {e}') from None
    with console_copy(info.is_main) as console, contextlib.ExitStack() as held:
        try:
            print_fn(f'{datetime.datetime.now():%Y-%m-%d %H:%M:%S} {" ".join(sys.argv)}')
            if checkpoint is not None:
                note_settings_not_resumed(saved_args(checkpoint), config, print_fn)
            if getattr(config, 'fast', False):
                print_fn(describe(config, device))
            config, files = settle(config, info, device, checkpoint, print_fn)
            # The checks passed: only now the run folder is made (a failed start leaves none), and claimed.
            error = distutil.broadcast_object(claim_run_folder(config, held, console, print_fn) if info.is_main
                                              else None)
            if error:
                raise UsageError(error)
            result = train(config, info, device, files, checkpoint, scripts, print_fn)
        except (UsageError, NonFiniteLossError, KeyboardInterrupt) as e:
            if console is not None:
                with contextlib.suppress(OutputError):  # a full disk: the message still reaches the screen
                    console.note(f'{"Interrupted" if isinstance(e, KeyboardInterrupt) else "ERROR"}: {e}\n')
            raise
        print_fn(f'Done; outputs in {config.output_dir}')
        return result


def train(config: TrainConfig, info: distutil.DistInfo, device: torch.device, files: Union[list[str], ShardSet],
          checkpoint: Any, scripts: str, print_fn: PrintFn) -> RunResult:
    """The epoch loop of a settled run: model, optimizer, resume; train; log, save and evaluate."""
    out = Path(config.output_dir)
    raw_model = build_model(config).to(device)
    loader, start_of_epoch = make_loader(config, info, files, device)
    precision = Precision.from_flag(config.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision.use_scaler)
    optimizer = build_optimizer(config, raw_model, device)
    start_epoch = config.start_epoch
    if config.init_from:
        load_initial_weights(raw_model, config.init_from, config.trust_checkpoint, print_fn)
    start_step = 0
    if checkpoint is not None:
        start_epoch = resume_from(checkpoint, config, info, raw_model, optimizer, scaler, print_fn)
        start_step = resumed_step(checkpoint, config, info, len(loader), print_fn)
    if info.is_main:  # lines of epochs after the start (a killed run's, or a fresh start's leftovers) go
        truncate_log(out / 'log.txt', start_epoch)

    model = raw_model
    if config.compile:  # before DDP wraps it: its gradient hooks then work as on the eager model
        compile_blocks(raw_model)
    if info.distributed:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == 'cuda' else None)
    print_fn(f'Model {config.model}: {sum(p.numel() for p in raw_model.parameters() if p.requires_grad) / 1e6:.2f}M '
             f'trainable parameters; precision {precision.dtype or torch.float32}; device {device}')
    print_fn(f'Arguments: {json.dumps(vars(config), default=str)}')

    schedule = Schedule(config.lr, config.min_lr, config.warmup_epochs, config.epochs, len(loader),
                        getattr(config, 'ema_decay_init', 0.0), getattr(config, 'ema_decay', 0.0))
    log_dir = Path(config.log_dir or out)
    with writing(log_dir):
        # purge_step: TensorBoard drops the points a killed run logged after its last checkpoint, so each
        # step shows once however often the run was stopped and resumed.
        writer = SummaryWriter(str(log_dir), purge_step=start_epoch * len(loader) + start_step) if info.is_main \
            else None
    vis = load_vis_samples(Path(config.data_path) / 'vis_samples', config.input_size[1], config.norm_stats)
    result = RunResult(out, raw_model)
    last_epoch = config.epochs if config.stop_at <= 0 else min(config.stop_at, config.epochs)
    clock = RunClock(start_epoch * len(loader) + start_step, last_epoch * len(loader))
    epoch = start_epoch

    def save_step(it: int) -> None:
        """checkpoint-last.pth every --save_every_steps steps (at the end of an accumulation window)."""
        done_steps = it + 1
        if not config.save_every_steps or done_steps % config.save_every_steps or done_steps % config.accum_iter \
                or done_steps == len(loader):
            return
        rng_states = distutil.all_gather_objects(rng_state())
        if info.is_main:
            path = out / STEP_CHECKPOINT
            with writing(path):
                save_checkpoint(path, raw_model, optimizer, scaler, epoch, config.to_namespace(), rng_states,
                                done_steps)
            with writing(log_dir):
                writer.flush()
            result.last_checkpoint = path
        distutil.barrier()

    try:
        for epoch in range(start_epoch, last_epoch):
            first_step = start_step if epoch == start_epoch else 0
            start_of_epoch(epoch, first_step)
            try:
                stats = train_one_epoch(model, raw_model, loader, optimizer, scaler, precision, schedule, epoch,
                                        device, config.mask_ratio, config.accum_iter, config.clip_grad,
                                        config.print_freq, info.world_size, writer, print_fn, clock, first_step,
                                        save_step)
            except ShardError as e:  # a shard that turned out bad when read: the checkpoints are intact
                hint = resume_hint(epoch + 1, result.last_checkpoint or config.resume or None)
                raise ShardError(f'{e} (stopped {hint})') from None
            except OSError as e:  # TensorBoard's writer thread; a full or read-only disk is never a data read
                if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
                    raise OutputError(log_dir, e) from e
                raise
            done = epoch + 1
            if info.is_main:
                with writing(out / 'log.txt'), open(out / 'log.txt', 'a') as f:
                    f.write(json.dumps({'epoch': done, **{f'train_{k}': v for k, v in stats.items()}}) + '\n')
                with writing(log_dir):
                    writer.flush()
            if done % config.save_freq == 0 or done == last_epoch:
                rng_states = distutil.all_gather_objects(rng_state())
                if info.is_main:
                    path = out / f'checkpoint-{done}.pth'
                    with writing(path):
                        save_checkpoint(path, raw_model, optimizer, scaler, done, config.to_namespace(), rng_states)
                    result.last_checkpoint = path
                    (out / STEP_CHECKPOINT).unlink(missing_ok=True)  # older than this one
                    print_fn(f'Saved {path}')
                    save_pictures(config, raw_model, done, vis)
                    if done >= config.eval_after:
                        proc = hooks.evaluate('quick', result.last_checkpoint, scripts, wait=False, print_fn=print_fn)
                        result.eval_processes += [proc] if proc else []
                distutil.barrier()
    except KeyboardInterrupt:
        raise Interrupted(resume_hint(epoch + 1, result.last_checkpoint or (config.resume or None))) from None
    finally:
        if writer is not None:
            with contextlib.suppress(OSError):  # flushed after every epoch; a failure was reported there
                writer.close()
    if info.is_main and result.last_checkpoint is not None:
        hooks.evaluate('all', result.last_checkpoint, scripts, wait=True, print_fn=print_fn)
    return result


def resumed_step(checkpoint: dict, config: TrainConfig, info: distutil.DistInfo, steps_per_epoch: int,
                 print_fn: PrintFn) -> int:
    """The steps of the resumed epoch that a step checkpoint (--save_every_steps) had done; 0 for an epoch
    checkpoint. The rest of that epoch is only defined for the world size and batch size that saved it."""
    step = int(checkpoint.get('step', 0)) if 'optimizer' in checkpoint else 0
    if not step:
        return 0
    stored = saved_args(checkpoint)
    saved_by = (stored.get('world_size'), stored.get('batch_size'))
    if saved_by != (info.world_size, config.batch_size) or step >= steps_per_epoch:
        raise UsageError(f'--resume {config.resume} was saved part-way through epoch {checkpoint["epoch"] + 1} (step '
                         f'{step}) by {saved_by[0]} processes of batch {saved_by[1]}; the rest of that epoch needs the '
                         f'same (now {info.world_size} of {config.batch_size}), or resume from an epoch checkpoint')
    print_fn(f'Resuming epoch {checkpoint["epoch"] + 1} at step {step + 1} of {steps_per_epoch}')
    return step


def save_pictures(config: TrainConfig, model: nn.Module, done: int, vis: tuple) -> None:
    """The loss curve so far and, with data/vis_samples, the masks of epoch `done` (in the run folder)."""
    out = Path(config.output_dir)
    with writing(out / 'loss.png'):
        save_loss_curve(out / 'log.txt', out / 'loss.png')
    names, lms = vis
    if lms is not None:
        with writing(out / f'vis-{done}.png'):
            save_mask_figure(model, lms, names, config.mask_ratio, out / f'vis-{done}.png', seed=config.seed)


def run(args: argparse.Namespace, script_dir: Optional[Path] = None) -> int:
    """`m2d train`: train as args say; -> 0. Errors raise M2DError (exit 2, or 1 when the loss diverged)
    and Ctrl-C raises Interrupted, for m2d.cli.common.guarded to report."""
    main(args, script_dir)
    return 0
