"""Layout-faithful weights from seeds, shared by the reference checks: each key of a published state dict
draws from its own NumPy PCG64 generator seeded by (seed, crc32(key)); positions are MAE's fixed sin-cos
tables, norm weights 1 + 0.1 N(0, 1), everything else 0.02 N(0, 1). Plain NumPy/PyTorch, so the recorders
that run with the published code import it too.
"""
import zlib
from typing import Iterable, Optional

import numpy as np
import torch


def sincos_table(dim: int, grid_f: int, grid_t: int) -> np.ndarray:
    """MAE's fixed 2-D sin-cos positions with a zero [CLS] row: [1 + F*T, dim] float32.
    Each half of dim encodes one axis (time first) as [sin, cos] of pos * 10000^(-2i/(dim/2))."""
    def axis(pos):
        omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))
        angles = pos.reshape(-1).astype(np.float64)[:, None] * omega[None]
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)
    t, f = np.meshgrid(np.arange(grid_t, dtype=np.float32), np.arange(grid_f, dtype=np.float32))
    table = np.concatenate([np.zeros((1, dim)), np.concatenate([axis(t), axis(f)], axis=1)])
    return table.astype(np.float32)


def seeded_state_dict(layout: Iterable, seed: int, grid_f: int,
                      keys: Optional[tuple[str, ...]] = None) -> dict[str, torch.Tensor]:
    """{key: float32 tensor} for each (key, shape) of `layout` (only those starting with one of `keys`, if
    given); grid_f: the patch grid's frequency rows, which with a table's length gives its time columns."""
    state = {}
    for key, shape in layout:
        if keys and not key.startswith(keys):
            continue
        rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
        parts = key.split('.')
        if key.endswith('pos_embed'):
            value = sincos_table(shape[2], grid_f, (shape[1] - 1) // grid_f)[None]
        elif len(parts) > 1 and 'norm' in parts[-2] and key.endswith('weight'):
            value = 1.0 + 0.1 * rng.standard_normal(shape)
        else:
            value = 0.02 * rng.standard_normal(shape)
        state[key] = torch.from_numpy(np.asarray(value, dtype=np.float32))
    return state
