"""Pictures saved at checkpoints: masks (and MSM-MAE reconstructions) on a few spectrograms, and the loss curve."""
import json
from pathlib import Path
from typing import Optional, Sequence, Union

import matplotlib
import torch

from m2d.model.vit import MaskedAutoencoderViT

matplotlib.use('Agg')  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)


def _save(fig: plt.Figure, path: Union[str, Path]) -> Path:
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


@torch.no_grad()
def save_mask_figure(model: MaskedAutoencoderViT, lms: torch.Tensor, names: Sequence[str], mask_ratio: float,
                     path: Union[str, Path], seed: int = 0) -> Path:
    """One row per sample of lms [B, 1, F, T]: the input, the input with masked patches blanked, and
    (for pixel-predicting models) the reconstruction. The same seed gives the same masks every time,
    so pictures of successive checkpoints compare; the caller's RNG state is left untouched."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=[device] if device.type == 'cuda' else []):
        torch.manual_seed(seed)
        loss, recons, _, mask = model.forward_viz(lms.to(device), mask_ratio)
    model.train(was_training)
    pf, pt = model.patch_size()
    pixel_mask = mask.repeat_interleave(pf, dim=1).repeat_interleave(pt, dim=2).cpu()  # [B, F, T], 1 = masked
    images = lms[:, 0].cpu().float()
    columns = [('input', images), ('masked', images.masked_fill(pixel_mask.bool(), float('nan')))]
    if recons is not None:
        columns.append(('reconstruction', recons[:, 0].cpu().float()))
    fig, axes = plt.subplots(len(images), len(columns), squeeze=False,
                             figsize=(4 * len(columns), 1.6 * len(images) + 0.6))
    for row, name in enumerate(names):
        for col, (title, data) in enumerate(columns):
            ax = axes[row, col]
            ax.imshow(data[row].numpy(), origin='lower', aspect='auto', interpolation='nearest', cmap='magma')
            ax.set_title(f'{name}: {title}', fontsize=8)
            ax.axis('off')
    fig.suptitle(f'mask ratio {mask_ratio}, loss {float(loss):.4f}', fontsize=9)
    return _save(fig, path)


def save_loss_curve(log_path: Union[str, Path], path: Union[str, Path]) -> Optional[Path]:
    """The training loss per epoch from a run's log.txt (a JSON line per epoch), with the learning rate
    on a second axis, saved as a picture; None when the log holds no epoch yet."""
    rows = [json.loads(line) for line in Path(log_path).read_text().splitlines() if line.strip()]
    if not rows:
        return None
    epochs = [r['epoch'] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot(epochs, [r['train_loss'] for r in rows], color='tab:blue', marker='.' if len(rows) < 30 else None)
    ax.set_xlabel('epoch')
    ax.set_ylabel('training loss', color='tab:blue')
    ax.set_yscale('log')
    ax.grid(alpha=0.3)
    lr_ax = ax.twinx()
    lr_ax.plot(epochs, [r['train_lr'] for r in rows], color='tab:orange', alpha=0.7)
    lr_ax.set_ylabel('learning rate (end of epoch)', color='tab:orange')
    ax.set_title(f'{Path(log_path).parent.name}: loss {rows[-1]["train_loss"]:.4f} at epoch {epochs[-1]}', fontsize=9)
    return _save(fig, path)
