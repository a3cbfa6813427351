"""Fixed 2-D sin-cos position embeddings (MAE convention) for a [F', T'] patch grid."""
import numpy as np
import torch


def _sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    """[M] positions -> [M, dim] as [sin(p * w_k) ..., cos(p * w_k) ...], w_k = 10000^(-2k/dim)."""
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    angles = np.outer(positions.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_pos_embed_2d(dim: int, grid_size: tuple[int, int], cls_token: bool = True) -> torch.Tensor:
    """Position table [1 + F'*T', dim] (or [F'*T', dim] without the [CLS] row).

    Tokens are flattened frequency-major (index = f * T' + t). The first half of the dims encodes
    the time index and the second half the frequency index; the [CLS] row is all zeros.
    """
    if dim % 4:
        raise ValueError(f'embedding dim must be a multiple of 4 for 2-D sin-cos positions, got {dim}')
    grid_f, grid_t = grid_size
    t_index, f_index = np.meshgrid(np.arange(grid_t, dtype=np.float32), np.arange(grid_f, dtype=np.float32))
    table = np.concatenate([_sincos_1d(dim // 2, t_index), _sincos_1d(dim // 2, f_index)], axis=1)
    if cls_token:
        table = np.concatenate([np.zeros([1, dim]), table], axis=0)
    return torch.from_numpy(table.astype(np.float32))
