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
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
import torch.nn as nn
from timm.optim import param_groups_weight_decay
from torch.nn.parallel import DistributedDataParallel
from torch.utils.tensorboard import SummaryWriter

from m2d.checkpoint import load_checkpoint, model_state, save_checkpoint, saved_args
from m2d.device import resolve_device
from m2d.errors import Interrupted, M2DError, OutputError, ShardError, UsageError
from m2d.outputs import writing
from m2d.train import hooks
from m2d.train.config import (
    TrainConfig,
    build_model,
    validate_args,
)
from m2d.train.console import console_copy
from m2d.train.data import (
    load_vis_samples,
    make_loader,
)
from m2d.train.engine import Precision, RunClock, Schedule, train_one_epoch
from m2d.train.fast import compile_blocks
from m2d.train.plots import save_loss_curve, save_mask_figure
from m2d.train.resume import load_initial_weights, resume_from, resume_hint, rng_state, seed_everything
from m2d.train.run_folder import (
    STEP_CHECKPOINT,
    truncate_log,
)
from m2d.train.setup import claim_run_folder, note_settings_not_resumed, settle
from m2d.train.shard_set import ShardSet
from util import dist as distutil
from util.atomic import save_atomic

PrintFn = Callable[[str], None]


@dataclass
class RunResult:
    output_dir: Path
    model: nn.Module
    last_checkpoint: Optional[Path] = None
    eval_processes: list = field(default_factory=list)


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
            config, files = settle(config, info, device, checkpoint, print_fn)
            # The checks passed: only now the run folder is made (a failed start leaves none), and claimed.
            error = distutil.broadcast_object(claim_run_folder(config, held, console, print_fn) if info.is_main
                                              else None)
            if error:
                raise UsageError(error)
            result = train(config, info, device, files, checkpoint, scripts, print_fn)
        except (M2DError, KeyboardInterrupt) as e:
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

    def save(path: Path, epochs_done: int, step: int = 0) -> None:
        """A checkpoint with every rank's RNG state, written by rank 0 (the caller then waits at a barrier)."""
        rng_states = distutil.all_gather_objects(rng_state())
        if info.is_main:
            with writing(path):
                save_checkpoint(path, raw_model, optimizer, scaler, epochs_done, config.to_namespace(), rng_states,
                                step)
            result.last_checkpoint = path

    def save_step(it: int) -> None:
        """checkpoint-last.pth every --save_every_steps steps (at the end of an accumulation window)."""
        done_steps = it + 1
        if not config.save_every_steps or done_steps % config.save_every_steps or done_steps % config.accum_iter \
                or done_steps == len(loader):
            return
        save(out / STEP_CHECKPOINT, epoch, done_steps)
        if info.is_main:
            with writing(log_dir):
                writer.flush()
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
                save(out / f'checkpoint-{done}.pth', done)
                if info.is_main:
                    (out / STEP_CHECKPOINT).unlink(missing_ok=True)  # older than this one
                    print_fn(f'Saved {result.last_checkpoint}')
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
