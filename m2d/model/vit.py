"""Masked modeling on log-mel spectrograms: MAE / MSM-MAE and Masked Modeling Duo (M2D).

All models take a spectrogram batch [B, 1, F, T] (F=80 mel bins) cut into a (F/pf, T/pt) grid of
patches, N tokens flattened frequency-major (index = f * T' + t). Parameter names and shapes follow
the published checkpoints, so their state dicts load as they are.

- `MaskedAutoencoderViT` (MAE, MSM-MAE): a ViT encoder sees the visible patches; a light decoder
  predicts the pixels of the masked ones.
- `M2DViT`: the online encoder sees the visible patches; a predictor ("decoder") predicts the
  representations that an EMA target encoder computes from the masked patches only.
- `M2D_D2ViT`: the M2D variant whose target encoder sees all patches (data2vec style).

Factories `<family>_vit_<size>` build them: families `mae`, `msm_mae`, `m2d`, `m2d_d2v`; sizes
`tiny` (D=192, 3 heads), `small` (D=384, 6 heads) and `base` (D=768, 12 heads, as published).
"""
import warnings
from functools import partial
from typing import Callable, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block

from m2d.model.masking import random_structured_mask, random_unstructured_mask, time_span_mask
from m2d.model.pos_embed import sincos_pos_embed_2d

# mask_ratio: a float (0 = no masking), or a given mask as (ids_restore [B, N], len_keep).
MaskSpec = Union[float, tuple[torch.Tensor, int]]

layer_norm = partial(nn.LayerNorm, eps=1e-6)


def _pair(size: Union[int, list, tuple]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _vit_blocks(dim: int, depth: int, num_heads: int, mlp_ratio: float) -> nn.ModuleList:
    return nn.ModuleList([Block(dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=layer_norm)
                          for _ in range(depth)])


def _gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """x [B, N, D], ids [B, K] -> x at those positions [B, K, D]."""
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


class MaskedAutoencoderViT(nn.Module):
    """MAE on spectrograms (MSM-MAE): predicts the pixels of masked patches.

    forward(imgs [B, C, F, T], mask_ratio) -> (loss, pred [B, N, pf*pt*C], mask [B, N]);
    mask is 1 on masked tokens, and the loss is averaged over them only.
    """

    def __init__(self, img_size=(80, 208), patch_size=(16, 16), in_chans: int = 1,
                 embed_dim: int = 768, depth: int = 12, num_heads: int = 12,
                 decoder_embed_dim: int = 512, decoder_depth: int = 8, decoder_num_heads: int = 16,
                 mlp_ratio: float = 4.0, norm_pix_loss: bool = False, encoder_only: bool = False):
        super().__init__()
        self.in_chans = in_chans
        self.norm_pix_loss = norm_pix_loss
        self.encoder_only = encoder_only
        self.mask_fn: Callable = random_unstructured_mask
        patch_size = _pair(patch_size)
        self.patch_embed = PatchEmbed(_pair(img_size), patch_size, in_chans, embed_dim, strict_img_size=False)
        num_patches = self.patch_embed.num_patches

        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim), requires_grad=False)
        self.blocks = _vit_blocks(embed_dim, depth, num_heads, mlp_ratio)
        self.norm = layer_norm(embed_dim)

        if not encoder_only:
            self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
            self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, decoder_embed_dim),
                                                  requires_grad=False)
            self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
            self.decoder_blocks = _vit_blocks(decoder_embed_dim, decoder_depth, decoder_num_heads, mlp_ratio)
            self.decoder_norm = layer_norm(decoder_embed_dim)
            self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size[0] * patch_size[1] * in_chans)  # pixels
        self.initialize_weights()

    # ----- structure -----------------------------------------------------------------------------

    def grid_size(self) -> tuple[int, int]:
        """Patch grid (F', T')."""
        return tuple(self.patch_embed.grid_size)

    def patch_size(self) -> tuple[int, int]:
        return tuple(self.patch_embed.patch_size)

    def set_random_structured_mask(self) -> None:
        """Mask whole frequency rows and time columns from now on (fine-tuning with a training mask)."""
        self.mask_fn = random_structured_mask

    def set_time_span_mask(self, span: int, share: float = 1.0) -> None:
        """Mask whole time columns in runs of `span` patches from now on, in `share` of the samples
        (pre-training with --mask_span; see masking.time_span_mask)."""
        self.mask_fn = partial(time_span_mask, span=span, share=share)

    def initialize_weights(self) -> None:
        """MAE init: fixed sin-cos positions, xavier-uniform Linear/patch weights, N(0, 0.02) tokens."""
        self.pos_embed.data.copy_(sincos_pos_embed_2d(self.pos_embed.shape[-1], self.grid_size())[None])
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        if not self.encoder_only:
            self.decoder_pos_embed.data.copy_(
                sincos_pos_embed_2d(self.decoder_pos_embed.shape[-1], self.grid_size())[None])
            nn.init.normal_(self.mask_token, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    # ----- patches and masks ---------------------------------------------------------------------

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """[B, C, F, T] -> [B, N, pf*pt*C], patch pixels in (pf, pt, C) order."""
        (pf, pt), (gf, gt) = self.patch_size(), self.grid_size()
        x = imgs.reshape(imgs.shape[0], self.in_chans, gf, pf, gt, pt)
        x = torch.einsum('bcfpgq->bfgpqc', x)
        return x.reshape(imgs.shape[0], gf * gt, pf * pt * self.in_chans)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, pf*pt*C] -> [B, C, F, T]."""
        (pf, pt), (gf, gt) = self.patch_size(), self.grid_size()
        x = x.reshape(x.shape[0], gf, gt, pf, pt, self.in_chans)
        x = torch.einsum('bfgpqc->bcfpgq', x)
        return x.reshape(x.shape[0], self.in_chans, gf * pf, gt * pt)

    def embed_patches(self, imgs: torch.Tensor) -> torch.Tensor:
        """[B, C, F, T] -> patch tokens with positions [B, N, D].

        T is the model's width W, or a shorter multiple of the patch width: a short input gets the
        positions of its first T / pt patch columns (as the later M2D runtime encodes a short chunk).
        """
        (F, W), pt = self.patch_embed.img_size, self.patch_size()[1]
        T = imgs.shape[-1]
        if imgs.ndim != 4 or tuple(imgs.shape[1:3]) != (self.in_chans, F) or not (T == W or (T < W and T % pt == 0)):
            raise ValueError(f'{type(self).__name__} takes input [B, {self.in_chans}, {F}, {W}] (or fewer frames, a '
                             f'multiple of {pt}), got {list(imgs.shape)}')
        x = self.patch_embed(imgs[..., :T // pt * pt])  # a width W that is no multiple of pt loses its last frames
        grid_f, D = self.grid_size()[0], x.shape[-1]
        positions = self.pos_embed[:, 1:].reshape(1, grid_f, -1, D)[:, :, :x.shape[1] // grid_f].reshape(1, -1, D)
        return x + positions

    def make_mask(self, batch: int, mask_ratio: MaskSpec, device: torch.device, grid: Optional[tuple[int, int]] = None
                  ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """-> ids_shuffle [B, N], ids_restore [B, N], len_keep (visible = ids_shuffle[:, :len_keep]).
        grid: the (F', T') patch grid of the input (default the model's)."""
        if isinstance(mask_ratio, (tuple, list)):
            ids_restore, len_keep = mask_ratio
            ids_restore = ids_restore.to(device)
            return torch.argsort(ids_restore, dim=1), ids_restore, int(len_keep)
        ids_shuffle, len_keep = self.mask_fn(batch, grid or self.grid_size(), mask_ratio, device)
        return ids_shuffle, torch.argsort(ids_shuffle, dim=1), len_keep

    def split_tokens(self, x: torch.Tensor, mask_ratio: MaskSpec
                     ) -> tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor, torch.Tensor]:
        """Tokens [B, N, D] -> (visible [B, K, D], masked [B, N-K, D] or None, mask [B, N], ids_restore [B, N]).

        Both token sets come in ids_shuffle order; mask is 1 where a token is masked.
        """
        B, N, _ = x.shape
        if not isinstance(mask_ratio, (tuple, list)) and mask_ratio == 0:
            ids = torch.arange(N, device=x.device).expand(B, N)
            return x, None, x.new_zeros(B, N, dtype=torch.float32), ids
        grid_f = self.grid_size()[0]
        ids_shuffle, ids_restore, len_keep = self.make_mask(B, mask_ratio, x.device, (grid_f, N // grid_f))
        mask = x.new_ones(B, N, dtype=torch.float32)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        return (_gather_tokens(x, ids_shuffle[:, :len_keep]), _gather_tokens(x, ids_shuffle[:, len_keep:]),
                mask, ids_restore)

    # ----- encoder and decoder -------------------------------------------------------------------

    def encode_tokens(self, tokens: torch.Tensor, blocks: nn.ModuleList, norm: nn.Module,
                      return_layers: bool = False, average_layers: Optional[list[int]] = None
                      ) -> Union[torch.Tensor, list[torch.Tensor]]:
        """Prepend [CLS] to tokens [B, K, D] and run a ViT -> [B, 1+K, D].

        return_layers: a list with every block's output, the last one after `norm`.
        average_layers: normalise the mean of these blocks' outputs instead of the last one's.
        """
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(tokens.shape[0], -1, -1)
        x = torch.cat([cls, tokens], dim=1)
        layers = []
        for i, blk in enumerate(blocks):
            x = blk(x)
            if return_layers or (average_layers and i in average_layers):
                layers.append(x)
        if average_layers:
            return norm(torch.stack(layers).mean(0))
        x = norm(x)
        if return_layers:
            layers[-1] = x
            return layers
        return x

    def forward_encoder(self, imgs: torch.Tensor, mask_ratio: MaskSpec = 0.0, return_layers: bool = False):
        """Online encoder on the visible patches.

        -> (latent [B, 1+K, D] (a list of per-block latents with return_layers), mask [B, N], ids_restore [B, N]).
        """
        visible, _, mask, ids_restore = self.split_tokens(self.embed_patches(imgs), mask_ratio)
        return self.encode_tokens(visible, self.blocks, self.norm, return_layers), mask, ids_restore

    def decode(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Decoder: latent [B, 1+K, D] -> predictions for every patch in grid order [B, N, Dp]."""
        x = self.decoder_embed(latent)
        B, N = ids_restore.shape
        mask_tokens = self.mask_token.expand(B, N + 1 - x.shape[1], -1)
        tokens = _gather_tokens(torch.cat([x[:, 1:], mask_tokens], dim=1), ids_restore)
        x = torch.cat([x[:, :1], tokens], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    forward_decoder = decode

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """MSE per patch against (per-patch standardised) pixels, averaged over masked patches."""
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        loss = ((pred - target) ** 2).mean(dim=-1)
        return (loss * mask).sum() / mask.sum()

    def forward(self, imgs: torch.Tensor, mask_ratio: MaskSpec = 0.75):
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio)
        pred = self.decode(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask), pred, mask

    @torch.no_grad()
    def forward_viz(self, imgs: torch.Tensor, mask_ratio: MaskSpec = 0.75):
        """-> (loss, recons [B, C, F, T] with visible patches from the input, error map, mask [B, F', T'])."""
        loss, pred, mask = self.forward(imgs, mask_ratio)
        visible = mask == 0
        pred = pred.clone()
        pred[visible] = self.patchify(imgs)[visible].to(pred.dtype)
        recons = self.unpatchify(pred)
        errormap = ((recons - imgs) ** 2).sqrt()
        return loss, recons, errormap, mask.reshape(mask.shape[0], *self.grid_size())


class M2DViT(MaskedAutoencoderViT):
    """Masked Modeling Duo: the predictor learns the EMA target encoder's view of the masked patches.

    forward(imgs, mask_ratio) -> (loss, pred [B, N-K, D], (ids_restore [B, N], mask [B, N])),
    pred in ids_shuffle order, as the target.
    """

    def __init__(self, *, loss_type: str = 'norm_mse', target_layers: Optional[list[int]] = None,
                 embed_dim: int = 768, depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0, **kwargs):
        if loss_type not in ('norm_mse', 'mse'):
            raise ValueError(f"loss_type must be 'norm_mse' or 'mse', got {loss_type!r}")
        if target_layers and not all(0 <= i < depth for i in target_layers):
            raise ValueError(f'target_layers {list(target_layers)} must index the {depth} target blocks')
        super().__init__(embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, **kwargs)
        self.loss_type = loss_type
        self.target_layers = list(target_layers) if target_layers else None
        if self.encoder_only:
            return
        # Built and initialised after the whole MAE, its pixel head replaced last, as the published code
        # does: the random draws come in the same order, so a seed gives the published initial weights.
        self.target_blocks = _vit_blocks(embed_dim, depth, num_heads, mlp_ratio)
        self.target_norm = layer_norm(embed_dim)
        self.target_blocks.requires_grad_(False)
        self.target_norm.requires_grad_(False)
        self.target_blocks.apply(self._init_weights)
        self.target_norm.apply(self._init_weights)
        self.decoder_pred = nn.Linear(self.decoder_pred.in_features, embed_dim)  # predicts target representations
        self.decoder_pred.apply(self._init_weights)

    def ema_pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(online, target) parameters in matching order: blocks->target_blocks, norm->target_norm."""
        online = [*self.blocks.parameters(), *self.norm.parameters()]
        target = [*self.target_blocks.parameters(), *self.target_norm.parameters()]
        return online, target

    @torch.no_grad()
    def update_target_network(self, ema_decay: float) -> None:
        """target = decay * target + (1 - decay) * online, in a few fused multi-tensor ops."""
        online, target = self.ema_pairs()
        torch._foreach_mul_(target, ema_decay)
        torch._foreach_add_(target, online, alpha=1.0 - ema_decay)

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Predictions for the masked tokens only, in ids_shuffle order: [B, N-K, D]."""
        pred = self.decode(latent, ids_restore)
        ids_masked = torch.argsort(ids_restore, dim=1)[:, latent.shape[1] - 1:]
        return _gather_tokens(pred, ids_masked)

    def forward_target(self, tokens: torch.Tensor, masked: torch.Tensor, ids_restore: torch.Tensor,
                       len_keep: int) -> torch.Tensor:
        """Target representations of the masked tokens [B, N-K, D] (M2D: encode masked tokens alone)."""
        return self.encode_tokens(masked, self.target_blocks, self.target_norm,
                                  average_layers=self.target_layers)[:, 1:]

    def forward_loss(self, target: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        if self.norm_pix_loss:
            mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        if self.loss_type == 'norm_mse':
            loss = 2 - 2 * (F.normalize(pred, dim=-1) * F.normalize(target, dim=-1)).sum(dim=-1)
        else:
            loss = ((pred - target) ** 2).mean(dim=-1)
        return loss.mean()

    def forward(self, imgs: torch.Tensor, mask_ratio: MaskSpec = 0.7):
        tokens = self.embed_patches(imgs)
        visible, masked, mask, ids_restore = self.split_tokens(tokens, mask_ratio)
        if masked is None:
            raise ValueError('M2D training needs masked tokens: mask_ratio must be > 0')
        latent = self.encode_tokens(visible, self.blocks, self.norm)
        pred = self.forward_decoder(latent, ids_restore)
        with torch.no_grad():
            target = self.forward_target(tokens.detach(), masked.detach(), ids_restore, visible.shape[1])
        return self.forward_loss(target, pred), pred, (ids_restore, mask)

    @torch.no_grad()
    def forward_viz(self, imgs: torch.Tensor, mask_ratio: MaskSpec = 0.7):
        """-> (loss, None, None, mask [B, F', T']): M2D predicts representations, not pixels."""
        loss, _, (_, mask) = self.forward(imgs, mask_ratio)
        return loss, None, None, mask.reshape(mask.shape[0], *self.grid_size())


class M2D_D2ViT(M2DViT):
    """M2D variant (data2vec style): the target encoder sees all patches; its outputs at the masked
    positions are the targets."""

    def forward_target(self, tokens: torch.Tensor, masked: torch.Tensor, ids_restore: torch.Tensor,
                       len_keep: int) -> torch.Tensor:
        encoded = self.encode_tokens(tokens, self.target_blocks, self.target_norm,
                                     average_layers=self.target_layers)[:, 1:]
        return _gather_tokens(encoded, torch.argsort(ids_restore, dim=1)[:, len_keep:])


# ----- factories -----------------------------------------------------------------------------------

ENCODER_SIZES = {'tiny': (192, 3), 'small': (384, 6), 'base': (768, 12)}  # (embed_dim, heads), depth 12
# Decoder width and heads per family and size; the base entries are the published ones.
DECODER_SIZES = {
    'mae': {'tiny': (128, 4), 'small': (256, 8), 'base': (512, 16)},
    'msm_mae': {'tiny': (96, 3), 'small': (192, 6), 'base': (384, 6)},
}
MSM_MAE_DECODER_DEPTH = 4


def _build(cls: type, size: str, decoder: str, patch_size=16, decoder_depth: int = 8, in_chans: int = 1,
           **kwargs) -> MaskedAutoencoderViT:
    embed_dim, heads = ENCODER_SIZES[size]
    dec_dim, dec_heads = DECODER_SIZES[decoder][size]
    kwargs.setdefault('depth', 12)
    return cls(patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, num_heads=heads,
               decoder_embed_dim=dec_dim, decoder_depth=decoder_depth, decoder_num_heads=dec_heads,
               mlp_ratio=4.0, **kwargs)


def _msm_mae(size: str, decoder_depth: int = MSM_MAE_DECODER_DEPTH, **kwargs) -> MaskedAutoencoderViT:
    if decoder_depth != MSM_MAE_DECODER_DEPTH:
        warnings.warn(f'MSM-MAE uses a {MSM_MAE_DECODER_DEPTH}-block decoder; decoder_depth={decoder_depth} '
                      'is ignored, as in the published code', stacklevel=3)
    return _build(MaskedAutoencoderViT, size, 'msm_mae', decoder_depth=MSM_MAE_DECODER_DEPTH, **kwargs)


def mae_vit_tiny(**kwargs): return _build(MaskedAutoencoderViT, 'tiny', 'mae', **kwargs)
def mae_vit_small(**kwargs): return _build(MaskedAutoencoderViT, 'small', 'mae', **kwargs)
def mae_vit_base(**kwargs): return _build(MaskedAutoencoderViT, 'base', 'mae', **kwargs)
def msm_mae_vit_tiny(**kwargs): return _msm_mae('tiny', **kwargs)
def msm_mae_vit_small(**kwargs): return _msm_mae('small', **kwargs)
def msm_mae_vit_base(**kwargs): return _msm_mae('base', **kwargs)
def m2d_vit_tiny(**kwargs): return _build(M2DViT, 'tiny', 'mae', **kwargs)
def m2d_vit_small(**kwargs): return _build(M2DViT, 'small', 'mae', **kwargs)
def m2d_vit_base(**kwargs): return _build(M2DViT, 'base', 'mae', **kwargs)
def m2d_d2v_vit_tiny(**kwargs): return _build(M2D_D2ViT, 'tiny', 'mae', **kwargs)
def m2d_d2v_vit_small(**kwargs): return _build(M2D_D2ViT, 'small', 'mae', **kwargs)
def m2d_d2v_vit_base(**kwargs): return _build(M2D_D2ViT, 'base', 'mae', **kwargs)


MODELS = {fn.__name__: fn for fn in (
    mae_vit_tiny, mae_vit_small, mae_vit_base, msm_mae_vit_tiny, msm_mae_vit_small, msm_mae_vit_base,
    m2d_vit_tiny, m2d_vit_small, m2d_vit_base, m2d_d2v_vit_tiny, m2d_d2v_vit_small, m2d_d2v_vit_base)}


def create_model(name: str, **kwargs) -> MaskedAutoencoderViT:
    """Build a model by factory name, e.g. create_model('m2d_vit_base', img_size=[80, 608])."""
    if name not in MODELS:
        raise ValueError(f'unknown model {name!r}; available: {", ".join(MODELS)}')
    return MODELS[name](**kwargs)
