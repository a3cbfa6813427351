"""Per-iteration schedules for pre-training: learning rate (warmup + half-cosine) and EMA decay."""
import math


def scaled_lr(blr: float, effective_batch: int) -> float:
    """The linear scaling rule: lr = blr * effective_batch / 256."""
    return blr * effective_batch / 256


def cosine_lr(epoch: float, lr: float, min_lr: float, warmup_epochs: float, epochs: float) -> float:
    """LR at a fractional epoch: linear warmup 0 -> lr over warmup_epochs, then a half cosine to min_lr.

    `epoch` = epoch index + iteration / iterations_per_epoch, so the schedule moves every iteration.
    """
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    progress = (epoch - warmup_epochs) / max(epochs - warmup_epochs, 1e-12)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def ema_decay(step: int, total_steps: int, decay_init: float, decay_final: float) -> float:
    """EMA decay at global iteration `step` of `total_steps`: linear from decay_init to decay_final,
    tau(s) = a + (b - a) * s / (S - 1)."""
    if total_steps <= 1:
        return decay_final
    return decay_init + (decay_final - decay_init) * min(step, total_steps - 1) / (total_steps - 1)
