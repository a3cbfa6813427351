"""Inference-only forward of an MAE/M2D encoder without masking (what RuntimeM2D encodes with).

It gives `MaskedAutoencoderViT.forward_encoder(imgs, 0.0)`'s outputs, up to float rounding, with
less work:
- `keep`: in the last block only these token positions get an attention output, MLP and final
  norm. Every token is still a key and a value there, and a full token in the blocks before,
  so the kept outputs do not change. RuntimeM2D keeps the real tokens of a zero-padded
  tail chunk: the padding must be encoded (it is attended to) but its outputs are dropped.
- On AMD CPUs, in float32 without autocast, gradients or torch.compile, the linear layers run as
  oneDNN inner products, the first MLP layer with its GELU fused in. MKL, torch's x86 BLAS, takes
  slower code paths off Intel CPUs: on an AMD EPYC oneDNN took 5-14% less time for the encoder's
  GEMMs, while on an Intel Xeon MKL was as fast or up to 13% faster (bench/RESULTS.md).
"""
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block

from m2d.model.vit import MaskedAutoencoderViT

# Private but long-standing (torch >= 2.0; torch.compile's CPU backend emits it); None without oneDNN.
_ONEDNN_LINEAR = getattr(torch.ops.mkldnn, '_linear_pointwise', None) if torch.backends.mkldnn.is_available() else None


def _amd_cpu() -> bool:
    try:
        return 'AuthenticAMD' in Path('/proc/cpuinfo').read_text()
    except OSError:  # not Linux
        return False


def _onednn_works() -> bool:
    """Whether the private op exists and computes GELU(x W^T + b) here: a torch release that changed its
    signature or results falls back to F.linear instead of failing or drifting."""
    if _ONEDNN_LINEAR is None:
        return False
    x, w, b = torch.randn(4, 8), torch.randn(16, 8), torch.randn(16)
    try:
        with torch.no_grad():
            return torch.allclose(_ONEDNN_LINEAR(x, w, b, 'gelu', [], 'none'), F.gelu(F.linear(x, w, b)), atol=1e-5)
    except RuntimeError:
        return False


USE_ONEDNN = _amd_cpu() and _onednn_works()


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, onednn: bool, gelu: bool = False
            ) -> torch.Tensor:
    """x @ weight.T + bias, then GELU (exact, as nn.GELU) when asked."""
    if onednn:
        return _ONEDNN_LINEAR(x, weight, bias, 'gelu' if gelu else 'none', [], 'none' if gelu else '')
    x = F.linear(x, weight, bias)
    return F.gelu(x) if gelu else x


def _block(blk: Block, x: torch.Tensor, onednn: bool, keep: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A timm ViT block (as models_mae builds them: no layer scale, no q/k norm) on x [B, N, D]
    -> [B, N, D], or with keep (token indices [K]) only those tokens' outputs [B, K, D]."""
    attn, (B, N, D) = blk.attn, x.shape
    qkv = _linear(blk.norm1(x), attn.qkv.weight, attn.qkv.bias, onednn)
    q, k, v = qkv.view(B, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    if keep is not None:  # queries (and so outputs) for the kept tokens only; keys and values for all
        q, x = q[:, :, keep], x[:, keep]
    o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, -1, D)
    x = x + _linear(o, attn.proj.weight, attn.proj.bias, onednn)
    mlp = blk.mlp
    h = _linear(blk.norm2(x), mlp.fc1.weight, mlp.fc1.bias, onednn, gelu=True)
    return x + _linear(h, mlp.fc2.weight, mlp.fc2.bias, onednn)


def encode_inference(model: MaskedAutoencoderViT, imgs: torch.Tensor, keep: Optional[torch.Tensor] = None,
                     return_layers: bool = False) -> Union[torch.Tensor, list[torch.Tensor]]:
    """Encoder outputs for all patches of imgs [B, C, F, T] -> latent [B, 1+N, D] after the final norm.

    keep: token indices ([CLS] is 0) whose outputs are wanted; the last block and the norm then
    return [B, len(keep), D]. return_layers: a list with every block's output (the last one after
    the norm), as forward_encoder gives.
    """
    onednn = (USE_ONEDNN and imgs.device.type == 'cpu' and imgs.dtype == torch.float32
              and not torch.is_autocast_enabled('cpu') and not torch.is_grad_enabled()
              and not torch.compiler.is_compiling())  # inductor picks its own kernels
    tokens = model.embed_patches(imgs)
    cls = (model.cls_token + model.pos_embed[:, :1]).expand(tokens.shape[0], -1, -1)
    x = torch.cat([cls, tokens], dim=1)
    layers = []
    for i, blk in enumerate(model.blocks):
        x = _block(blk, x, onednn, keep if i == len(model.blocks) - 1 else None)
        layers += [x] if return_layers else []
    x = model.norm(x)
    return layers[:-1] + [x] if return_layers else x
