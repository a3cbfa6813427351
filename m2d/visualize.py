"""Pictures of masks (and MSM-MAE reconstructions) on a few spectrograms, saved at checkpoints."""
from pathlib import Path
from typing import Sequence, Union

import matplotlib
import torch

from .models_mae import MaskedAutoencoderViT

matplotlib.use('Agg')  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)


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
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
