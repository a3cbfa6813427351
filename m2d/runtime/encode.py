"""How RuntimeM2D encodes an LMS longer or shorter than the model's width: split time into chunks of the
input width W, encode all chunks in batched passes, drop what came from padding, and lay the tokens out
as frame features (or flat token features)."""
import contextlib
from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F
from einops import rearrange

if TYPE_CHECKING:
    from m2d.runtime.runtime import RuntimeM2D


def split_last_chunk(runtime: 'RuntimeM2D', lms: torch.Tensor) -> list[tuple[torch.Tensor, int]]:
    """(LMS, chunk width) parts to encode: all of it in chunks of the model width ('pad'), or with
    last_chunk 'trim' the whole chunks, then the rest padded to whole patches as one shorter chunk."""
    W, pt, T = runtime.cfg.input_size[1], runtime.cfg.patch_size[1], lms.shape[-1]
    if runtime.cfg.last_chunk == 'pad' or T % W == 0:
        return [(lms, W)]
    whole = T // W * W
    # Whole patches, but never wider than W (a W that is no multiple of pt, e.g. 1001, ends in a partial patch).
    rest = F.pad(lms[..., whole:], (0, min(-(T - whole) % pt, W - (T - whole))))
    return ([(lms[..., :whole], W)] if whole else []) + [(rest, rest.shape[-1])]


def encode_chunks(runtime: 'RuntimeM2D', lms: torch.Tensor, return_layers: bool, width: Optional[int] = None
                  ) -> list[torch.Tensor]:
    """LMS [B, 1, F, T] -> per-layer features [B, ceil(T / pt), D'] (flat: [B, tokens, D]) from chunks of
    W frames (`width`, default the model's) encoded in batched passes.

    The last chunk is right-padded with zeros to W and its padded frames are dropped, so a pass of
    such tail chunks computes only the real tokens' outputs in the last block (eval mode; flat
    features keep every token).
    """
    B, _, n_mels, T = lms.shape
    W, pt = width or runtime.cfg.input_size[1], runtime.cfg.patch_size[1]
    n_chunks = -(-T // W)  # a chunk made only of padding is never encoded
    chunks = F.pad(lms, (0, n_chunks * W - T)).reshape(B, 1, n_mels, n_chunks, W).permute(0, 3, 1, 2, 4)
    grid_t = W // pt  # a width that is no multiple of pt loses its last partial patch
    tail_frames = min(-(-(T - (n_chunks - 1) * W) // pt), grid_t)
    if tail_frames == grid_t or runtime.cfg.flat_features:
        groups = [(chunks, grid_t)]
    else:
        groups = [(chunks[:, :-1], grid_t), (chunks[:, -1:], tail_frames)]
    per_group = [[to_frames(runtime, latent, B, frames)
                  for latent in encode_group(runtime, group.reshape(-1, 1, n_mels, W), frames, return_layers)]
                 for group, frames in groups if group.shape[1]]
    return [torch.cat(layer, dim=1) for layer in zip(*per_group)]


def encode_group(runtime: 'RuntimeM2D', chunks: torch.Tensor, frames: int, return_layers: bool) -> list[torch.Tensor]:
    """Chunks [M, 1, F, W] of which the first `frames` frames are wanted -> per-layer latents
    [M, 1+K', D] in batched passes (K' = grid_f * frames in eval mode, else all K tokens)."""
    mask_ratio = runtime.cfg.training_mask if runtime.training else 0.0
    # A structured training mask draws its row count once per pass, so every chunk must share
    # one pass for all of them to keep the same number of tokens. On a CPU, passes much larger
    # than 8 chunks (1528 tokens) ran slower: their activations outgrow the caches.
    chunks_per_pass = int(runtime.cfg.max_chunks_per_pass) or (8 if runtime.device.type == 'cpu' else 256)
    step = len(chunks) if mask_ratio > 0 else max(1, chunks_per_pass)
    grid_t = chunks.shape[-1] // runtime.cfg.patch_size[1]
    keep = None
    if frames < grid_t and not runtime.training:  # [CLS] and the tokens of the first `frames` frames in every row
        # Built on the device: copying it there would wait for the GPU to finish the passes before.
        rows = torch.arange(runtime.grid_f * grid_t, device=runtime.device).view(runtime.grid_f, grid_t)
        keep = F.pad(rows[:, :frames].flatten() + 1, (1, 0))
    # Enter autocast only when asked: autocast(enabled=False) would switch off a caller's own autocast.
    autocast = (torch.autocast(runtime.device.type, dtype=torch.bfloat16) if runtime.cfg.autocast_bf16
                else contextlib.nullcontext())
    per_pass = []
    with autocast:
        for i in range(0, len(chunks), step):
            if runtime.training:  # masking and gradients: the model's own forward
                latent, *_ = runtime._forward_encoder(chunks[i:i + step], mask_ratio, return_layers)
            else:
                latent = runtime._encode_inference(runtime.backbone, chunks[i:i + step], keep, return_layers)
            per_pass.append(latent if return_layers else [latent])
    return [torch.cat(layer, dim=0).float() for layer in zip(*per_pass)]


def to_frames(runtime: 'RuntimeM2D', latent: torch.Tensor, batch: int, frames: int) -> torch.Tensor:
    """[B*m, 1+K', D] latents of m chunks per clip -> [B, m*frames, D'] (frame features, the first
    `frames` of each chunk; or flat token features [B, m*K', D])."""
    cls, tokens = latent[:, :1], latent[:, 1:]
    if not runtime.cfg.flat_features:
        tokens = rearrange(tokens, 'b (f t) d -> b t (f d)', f=runtime.grid_f)[:, :frames]
    if runtime.cfg.cls_token:
        tokens = torch.cat([cls.expand(-1, tokens.shape[1], -1), tokens], dim=-1)
    return tokens.reshape(batch, -1, tokens.shape[-1])

