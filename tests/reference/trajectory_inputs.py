"""Fixed inputs of the pre-training trajectory reference (published_trajectory.npz): a tiny M2D, its
initial weights and a small LMS dataset, regenerated exactly from seeds. Plain NumPy/PyTorch, so both
the recorder (make_published_trajectory.py, run with the published code) and our tests import it.

The weights cover every key of the published M2D state dict for the tiny model (layout()); each key
is drawn as seeded_weights.py draws the golden checks' weights.
"""
from pathlib import Path

import numpy as np
import torch
from seeded_weights import seeded_state_dict

# The tiny M2D: the published architecture with small widths (a ViT encoder, its EMA target, a predictor).
# MLP ratio 2 (published: 4) keeps the reference, two runs of weights and AdamW state, near 1 MB.
MODEL = dict(embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2,
             mlp_ratio=2.0)
INPUT_SIZE = (80, 64)  # F x T of a training crop: a 5 x 4 grid of 16 x 16 patches
PATCH_SIZE = (16, 16)
WEIGHTS_SEED = 0
DATA_SEED = 1
NORM_STATS = (-4.5, 2.5)  # given explicitly, so neither run estimates them

# 38 files of 1 x 80 x T: 4 shorter than the crop (right-padded), one exactly a crop, the rest longer
# (random crops). 38 is no multiple of a batch of 4: the last 2 files of each epoch's order are dropped.
FRAMES = [20, 41, 63, 64, 65, 66, 70, 77, 80, 90, 96, 100, 111, 120, 128, 130, 150, 160, 175, 190,
          200, 208, 230, 250, 260, 290, 300, 333, 350, 380, 400, 420, 450, 480, 500, 555, 600, 700]

# The recorded runs: the published train_audio.py flags besides the data and run folders (the published
# defaults otherwise: blr 3e-4, weight decay 0.05, mask ratio 0.7, EMA 0.99995 -> 0.99999, norm_mse, seed 0).
COMMON_FLAGS = ['--input_size', f'{INPUT_SIZE[0]}x{INPUT_SIZE[1]}', '--patch_size', f'{PATCH_SIZE[0]}x{PATCH_SIZE[1]}',
                '--decoder_depth', str(MODEL['decoder_depth']), '--epochs', '3', '--warmup_epochs', '1',
                '--norm_stats', f'[{NORM_STATS[0]}, {NORM_STATS[1]}]', '--num_workers', '0', '--device', 'cpu']
RUNS = {'accum1': ['--batch_size', '4', '--accum_iter', '1'],
        'accum2': ['--batch_size', '2', '--accum_iter', '2']}


def grid_size() -> tuple[int, int]:
    return INPUT_SIZE[0] // PATCH_SIZE[0], INPUT_SIZE[1] // PATCH_SIZE[1]


def layout() -> list[tuple[str, tuple[int, ...]]]:
    """(key, shape) of every entry of the published M2D state dict for MODEL, in state-dict order."""
    D, Dd = MODEL['embed_dim'], MODEL['decoder_embed_dim']
    n_tokens = grid_size()[0] * grid_size()[1]

    def block(prefix: str, dim: int) -> list:
        hidden = int(dim * MODEL['mlp_ratio'])
        shapes = [('norm1.weight', (dim,)), ('norm1.bias', (dim,)), ('attn.qkv.weight', (3 * dim, dim)),
                  ('attn.qkv.bias', (3 * dim,)), ('attn.proj.weight', (dim, dim)), ('attn.proj.bias', (dim,)),
                  ('norm2.weight', (dim,)), ('norm2.bias', (dim,)), ('mlp.fc1.weight', (hidden, dim)),
                  ('mlp.fc1.bias', (hidden,)), ('mlp.fc2.weight', (dim, hidden)), ('mlp.fc2.bias', (dim,))]
        return [(f'{prefix}.{name}', shape) for name, shape in shapes]

    def blocks(prefix: str, depth: int, dim: int) -> list:
        return [entry for i in range(depth) for entry in block(f'{prefix}.{i}', dim)]

    def norm(prefix: str, dim: int) -> list:
        return [(f'{prefix}.weight', (dim,)), (f'{prefix}.bias', (dim,))]

    return [('cls_token', (1, 1, D)), ('pos_embed', (1, 1 + n_tokens, D)), ('mask_token', (1, 1, Dd)),
            ('decoder_pos_embed', (1, 1 + n_tokens, Dd)),
            ('patch_embed.proj.weight', (D, 1, *PATCH_SIZE)), ('patch_embed.proj.bias', (D,)),
            *blocks('blocks', MODEL['depth'], D), *norm('norm', D),
            ('decoder_embed.weight', (Dd, D)), ('decoder_embed.bias', (Dd,)),
            *blocks('decoder_blocks', MODEL['decoder_depth'], Dd), *norm('decoder_norm', Dd),
            ('decoder_pred.weight', (D, Dd)), ('decoder_pred.bias', (D,)),
            *blocks('target_blocks', MODEL['depth'], D), *norm('target_norm', D)]


def initial_state_dict(seed: int = WEIGHTS_SEED) -> dict[str, torch.Tensor]:
    """The fixed initial weights: {key: float32 tensor} for every key of layout()."""
    return seeded_state_dict(layout(), seed, grid_size()[0])


def write_dataset(folder: Path, seed: int = DATA_SEED) -> Path:
    """Write the LMS files (folder/lms/clipNN.npy, float32 (1, 80, T)) and their list folder/files.csv
    (a `file_name` column, paths relative to folder); -> the CSV path.

    Each file is a smooth spectral envelope plus noise around NORM_STATS, so crops differ by position."""
    folder = Path(folder)
    (folder / 'lms').mkdir(parents=True, exist_ok=True)
    names = []
    for i, frames in enumerate(FRAMES):
        rng = np.random.default_rng([seed, i])
        envelope = np.cumsum(rng.standard_normal((1, INPUT_SIZE[0], 1)), axis=1) * 0.3
        drift = np.cumsum(rng.standard_normal((1, 1, frames)), axis=2) * 0.1
        lms = NORM_STATS[0] + envelope + drift + NORM_STATS[1] * rng.standard_normal((1, INPUT_SIZE[0], frames))
        name = f'lms/clip{i:02d}.npy'
        np.save(folder / name, lms.astype(np.float32))
        names.append(name)
    csv = folder / 'files.csv'
    csv.write_text('file_name\n' + ''.join(f'{n}\n' for n in names))
    return csv
