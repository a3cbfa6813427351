"""One pre-training epoch, and the pieces of one training step (shared with bench/bench_train.py).

A step: forward under autocast -> loss / accum_iter -> backward (through a GradScaler for fp16) ->
on the last micro-batch of an accumulation window: unscale, clip the gradient norm (when asked; the
published runs never clipped), optimizer step (skipped by the scaler when fp16 gradients overflowed),
zero grads, and (M2D) the EMA update of the target network, which runs after a skipped step too.
"""
import contextlib
import datetime
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import torch
import torch.nn as nn
from torch.utils.tensorboard import SummaryWriter

from m2d.errors import NonFiniteLossError
from util.dist import all_reduce_mean
from util.schedules import cosine_lr, ema_decay

AMP_DTYPES = {'fp16': torch.float16, 'bf16': torch.bfloat16, 'none': None}


@dataclass
class Precision:
    """Mixed-precision settings: autocast dtype (None = fp32) and whether fp16 needs a GradScaler."""
    dtype: Optional[torch.dtype]
    device_type: str

    @property
    def use_scaler(self) -> bool:
        return self.dtype == torch.float16

    def autocast(self):
        return torch.autocast(self.device_type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None)

    @classmethod
    def from_flag(cls, amp: Optional[str], device: torch.device) -> 'Precision':
        """--amp fp16 | bf16 | none; None: fp16 on CUDA, as the published recipe (autocast with a dynamic
        loss scaler: a step whose gradients overflow is skipped), fp32 on the CPU."""
        if amp is None:
            amp = 'fp16' if device.type == 'cuda' else 'none'
        return cls(AMP_DTYPES[amp], device.type)


@dataclass
class Schedule:
    """Per-iteration LR and EMA schedules of one run."""
    lr: float
    min_lr: float
    warmup_epochs: float
    epochs: int
    iters_per_epoch: int
    ema_decay_init: float
    ema_decay_final: float

    def lr_at(self, epoch: int, it: int) -> float:
        return cosine_lr(epoch + it / self.iters_per_epoch, self.lr, self.min_lr, self.warmup_epochs, self.epochs)

    def ema_at(self, epoch: int, it: int) -> float:
        return ema_decay(epoch * self.iters_per_epoch + it, self.iters_per_epoch * self.epochs,
                         self.ema_decay_init, self.ema_decay_final)


def _hms(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds))) if math.isfinite(seconds) else '?'


@dataclass
class RunClock:
    """Elapsed time of this process's part of a run and the time left, estimated from its speed so far."""
    first_step: int  # global step this process started at (after a resume, not 0)
    last_step: int   # global step at which the run ends (--stop_at included)
    started: float = field(default_factory=time.perf_counter)

    def progress(self, step: int) -> str:
        """'elapsed 0:01:02  ETA 0:10:05' once `step` global steps are done."""
        elapsed = time.perf_counter() - self.started
        done = step - self.first_step
        left = elapsed / done * (self.last_step - step) if done > 0 else float('nan')
        return f'elapsed {_hms(elapsed)}  ETA {_hms(left)}'


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group['lr'] = lr * group.get('lr_scale', 1.0)


def forward_backward(model: nn.Module, samples: torch.Tensor, mask_ratio: float, precision: Precision,
                     scaler: torch.amp.GradScaler, accum_iter: int = 1) -> torch.Tensor:
    """Loss of one micro-batch [B, 1, F, T] (detached), after its backward pass."""
    with precision.autocast():
        loss = model(samples, mask_ratio=mask_ratio)[0]
    scaler.scale(loss / accum_iter).backward()
    return loss.detach()


def optimizer_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                   params: list[torch.Tensor], clip_grad: float) -> None:
    """Unscale, clip the gradient norm (clip_grad > 0), step, and zero the gradients."""
    if clip_grad > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, clip_grad)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def update_target(model: nn.Module, decay: float) -> None:
    """M2D: EMA update of the target network (models without one are left alone)."""
    if hasattr(model, 'update_target_network'):
        model.update_target_network(decay)


def train_one_epoch(model: nn.Module, raw_model: nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler, precision: Precision, schedule: Schedule, epoch: int,
                    device: torch.device, mask_ratio: float, accum_iter: int = 1, clip_grad: float = 0.0,
                    print_freq: int = 20, world_size: int = 1, log_writer: Optional[SummaryWriter] = None,
                    print_fn: Callable[[str], None] = print, clock: Optional[RunClock] = None, start_step: int = 0,
                    after_step: Optional[Callable[[int], None]] = None) -> dict[str, float]:
    """Train one epoch; -> {'loss', 'lr', 'ema_decay', 'samples_per_s'} (loss averaged over steps and ranks;
    lr and ema_decay as at the last step).

    start_step: the steps of this epoch already done (a mid-epoch resume; the loader yields the rest);
    after_step(step): called after each step (e.g. to save a step checkpoint).

    model: what to call (DDP-wrapped and/or compiled); raw_model: the plain module (EMA, parameters).
    Every step's loss, lr and EMA decay go to log_writer (TensorBoard); every print_freq steps a progress
    line, with the elapsed time and the time left of the run when a clock is given.
    Raises NonFiniteLossError naming the epoch and step if the loss turns NaN or inf.
    """
    model.train(True)
    params = [p for p in raw_model.parameters() if p.requires_grad]
    has_target = hasattr(raw_model, 'update_target_network')
    n_iters = schedule.iters_per_epoch
    loss_sum, lr, decay = 0.0, 0.0, schedule.ema_at(epoch, 0)
    t_epoch = t_print = time.perf_counter()
    samples_since_print = samples_seen = 0
    optimizer.zero_grad(set_to_none=True)
    for it, samples in enumerate(loader, start_step):
        if it % accum_iter == 0:
            lr = schedule.lr_at(epoch, it)
            set_lr(optimizer, lr)
        update = (it + 1) % accum_iter == 0
        samples = samples.to(device, non_blocking=True)
        # DDP: synchronise gradients only on the micro-batch that ends an accumulation window.
        sync = contextlib.nullcontext() if update or not hasattr(model, 'no_sync') else model.no_sync()
        with sync:
            loss = forward_backward(model, samples, mask_ratio, precision, scaler, accum_iter)
        loss_value = all_reduce_mean(loss.float()).item()  # the same value, and decision, on every rank
        if not math.isfinite(loss_value):
            raise NonFiniteLossError(f'loss is {loss_value} at epoch {epoch + 1}, step {it + 1}/{n_iters}; '
                                     'stopping (the last saved checkpoint is intact)')
        if update:
            optimizer_step(optimizer, scaler, params, clip_grad)
            decay = schedule.ema_at(epoch, it)
            update_target(raw_model, decay)
        loss_sum += loss_value
        samples_seen += samples.shape[0] * world_size
        samples_since_print += samples.shape[0] * world_size
        step = epoch * n_iters + it
        if log_writer is not None:
            log_writer.add_scalar('train_loss', loss_value, step)
            log_writer.add_scalar('lr', lr, step)
            if has_target:
                log_writer.add_scalar('ema_decay', decay, step)
        if (it + 1) % print_freq == 0 or it + 1 == n_iters:
            now = time.perf_counter()
            speed = samples_since_print / max(now - t_print, 1e-9)
            ema_text = f'ema {decay:.6f}  ' if has_target else ''
            clock_text = f'  {clock.progress(step + 1)}' if clock is not None else ''
            print_fn(f'Epoch [{epoch + 1}/{schedule.epochs}] step [{it + 1}/{n_iters}]  loss {loss_value:.4f}  '
                     f'lr {lr:.3e}  {ema_text}{speed:.1f} samples/s{clock_text}')
            if log_writer is not None:
                log_writer.add_scalar('samples_per_s', speed, step)
            t_print, samples_since_print = now, 0
        if after_step is not None:
            after_step(it)
    elapsed = time.perf_counter() - t_epoch
    return {'loss': loss_sum / max(n_iters - start_step, 1), 'lr': lr, 'ema_decay': decay,
            'samples_per_s': samples_seen / elapsed}
