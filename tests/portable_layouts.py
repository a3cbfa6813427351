"""Random ViT-B weights in each layout of the M2D family's released files, made deterministically from a seed.

Shared by tests/reference/make_portable_refs.py, which runs the later runtime's portable_m2d.py on them
to record reference outputs, and tests/test_later_formats.py, which rebuilds the same files and checks
RuntimeM2D against those outputs. Within an encoder (and the target encoder, which starts as its copy)
all blocks share their four weight matrices while each has its own norms and biases: the files stay
small (tens of MB) and every block still acts differently.
"""
import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from m2d.model.pos_embed import sincos_pos_embed_2d

D, DEC_D = 768, 512  # ViT-B and its M2D predictor width (portable_m2d.py builds ViT-B only)


class Weights:
    """Named random tensors drawn in call order from one seeded generator."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)

    def normal(self, *shape: int, std: float = 0.04, mean: float = 0.0) -> torch.Tensor:
        return torch.from_numpy((mean + std * self.rng.standard_normal(shape)).astype(np.float32))

    def blocks(self, prefix: str, depth: int, dim: int, shared: Optional[dict] = None) -> dict[str, torch.Tensor]:
        """`prefix.i.*` timm ViT blocks: shared matrices (given or drawn once), per-block norms and biases."""
        shared = shared or {'attn.qkv.weight': self.normal(3 * dim, dim), 'attn.proj.weight': self.normal(dim, dim),
                            'mlp.fc1.weight': self.normal(4 * dim, dim), 'mlp.fc2.weight': self.normal(dim, 4 * dim)}
        state = {}
        for i in range(depth):
            own = {'norm1.weight': self.normal(dim, std=0.1, mean=1.0), 'norm1.bias': self.normal(dim, std=0.05),
                   'attn.qkv.bias': self.normal(3 * dim, std=0.02), 'attn.proj.bias': self.normal(dim, std=0.02),
                   'norm2.weight': self.normal(dim, std=0.1, mean=1.0), 'norm2.bias': self.normal(dim, std=0.05),
                   'mlp.fc1.bias': self.normal(4 * dim, std=0.02), 'mlp.fc2.bias': self.normal(dim, std=0.02)}
            state.update({f'{prefix}.{i}.{k}': v for k, v in {**shared, **own}.items()})
        return state

    def encoder(self, input_size, patch_size, depth: int = 12) -> dict[str, torch.Tensor]:
        (F, T), (pf, pt) = input_size, patch_size
        state = {'cls_token': self.normal(1, 1, D, std=0.02),
                 'pos_embed': sincos_pos_embed_2d(D, (F // pf, T // pt))[None],
                 'patch_embed.proj.weight': self.normal(D, 1, pf, pt, std=1 / np.sqrt(pf * pt)),
                 'patch_embed.proj.bias': self.normal(D, std=0.02)}
        state.update(self.blocks('blocks', depth, D))
        state.update({'norm.weight': self.normal(D, std=0.1, mean=1.0), 'norm.bias': self.normal(D, std=0.05)})
        return state

    def pretraining(self, encoder: dict, input_size, patch_size, decoder_depth: int) -> dict[str, torch.Tensor]:
        """M2D's predictor and EMA target encoder (the target shares the online encoder's tensors)."""
        (F, T), (pf, pt) = input_size, patch_size
        state = {'mask_token': self.normal(1, 1, DEC_D, std=0.02),
                 'decoder_pos_embed': sincos_pos_embed_2d(DEC_D, (F // pf, T // pt))[None],
                 'decoder_embed.weight': self.normal(DEC_D, D), 'decoder_embed.bias': self.normal(DEC_D, std=0.02)}
        state.update(self.blocks('decoder_blocks', decoder_depth, DEC_D))
        state.update({'decoder_norm.weight': self.normal(DEC_D, std=0.1, mean=1.0),
                      'decoder_norm.bias': self.normal(DEC_D, std=0.05),
                      'decoder_pred.weight': self.normal(D, DEC_D), 'decoder_pred.bias': self.normal(D, std=0.02)})
        state.update({'target_' + k: v for k, v in encoder.items() if k.startswith(('blocks.', 'norm.'))})
        return state

    def mlp(self, prefix: str, dim_in: int, hidden: int, dim_out: int) -> dict[str, torch.Tensor]:
        return {f'{prefix}.0.weight': self.normal(hidden, dim_in), f'{prefix}.0.bias': self.normal(hidden, std=0.02),
                f'{prefix}.2.weight': self.normal(dim_out, hidden), f'{prefix}.2.bias': self.normal(dim_out, std=0.02)}

    def semantic_proj(self, depth: int) -> dict[str, torch.Tensor]:
        """M2D-CLAP 2025's audio projection: [SEM] token, one-head blocks with mlp_ratio 1, LayerNorm."""
        state = {'audio_proj.sem_token': self.normal(1, 1, D, std=0.02)}
        shared = {'attn.qkv.weight': self.normal(3 * D, D), 'attn.proj.weight': self.normal(D, D),
                  'mlp.fc1.weight': self.normal(D, D), 'mlp.fc2.weight': self.normal(D, D)}
        for i in range(depth):
            state.update({f'audio_proj.sem_blocks.{i}.{k}': v for k, v in shared.items()})
            state.update({f'audio_proj.sem_blocks.{i}.{k}': self.normal(*shape, std=std, mean=mean)
                          for k, shape, std, mean in (('norm1.weight', (D,), 0.1, 1.0), ('norm1.bias', (D,), 0.05, 0.0),
                                                      ('attn.qkv.bias', (3 * D,), 0.02, 0.0),
                                                      ('attn.proj.bias', (D,), 0.02, 0.0),
                                                      ('norm2.weight', (D,), 0.1, 1.0), ('norm2.bias', (D,), 0.05, 0.0),
                                                      ('mlp.fc1.bias', (D,), 0.02, 0.0),
                                                      ('mlp.fc2.bias', (D,), 0.02, 0.0))})
        state.update({'audio_proj.norm.weight': self.normal(D, std=0.1, mean=1.0),
                      'audio_proj.norm.bias': self.normal(D, std=0.05)})
        return state


def norm_stats(mean: float, std: float) -> dict[str, torch.Tensor]:
    return {'norm_stats': torch.tensor([mean, std])}


# ----- the layouts -----------------------------------------------------------------------------------

def first_release(w: Weights) -> Any:
    """m2d_vit_base-80x608p16x16-220930-mr7/checkpoint-300.pth: full M2D, training args, no norm_stats."""
    size, patch = [80, 608], [16, 16]
    enc = w.encoder(size, patch)
    args = argparse.Namespace(model='m2d_vit_base', input_size=size, patch_size=patch, decoder_depth=2, mask_ratio=0.7)
    return {'model': {**enc, **w.pretraining(enc, size, patch, 2)}, 'epoch': 300, 'args': args}


def later_p16k(w: Weights) -> Any:
    """A later trainer's full checkpoint: 80x208 with a sample-rate part and stored norm_stats."""
    size, patch = [80, 208], [16, 16]
    enc = w.encoder(size, patch)
    return {'model': {**norm_stats(-7.25, 4.35), **enc, **w.pretraining(enc, size, patch, 1)}}


def as_p32k_enconly(w: Weights) -> Any:
    """m2d_as_vit_base-80x608p16x16p32k-240413_enconly: a bare encoder-only state dict at 32 kHz."""
    return {**norm_stats(-6.8, 4.5), **w.encoder([80, 608], [16, 16])}


def frames_40ms(w: Weights) -> Any:
    """m2d_vit_base-80x200p16x4-230529: 40 ms frames (patch 16x4), full, no norm_stats."""
    size, patch = [80, 200], [16, 4]
    enc = w.encoder(size, patch)
    return {'model': {**enc, **w.pretraining(enc, size, patch, 1)}}


def as_with_heads(w: Weights) -> Any:
    """m2d_as_vit_base-80x608p16x16-240213: M2D-AS pre-training, with its offline predictor (527 classes)."""
    size, patch = [80, 608], [16, 16]
    enc = w.encoder(size, patch)
    head = {'offline_predictor.weight': w.normal(527, 5 * D), 'offline_predictor.bias': w.normal(527, std=0.02)}
    return {'model': {**norm_stats(-7.2, 4.3), **enc, **w.pretraining(enc, size, patch, 1), **head}}


def evar_finetuned(w: Weights) -> Any:
    """m2d_as_vit_base-80x1001p16x16-240213_AS-FT_enconly: an EVAR fine-tuning checkpoint with its task head."""
    backbone = {**norm_stats(-7.1, 4.2), **w.encoder([80, 1001], [16, 16])}
    state = {'module.ar.runtime.backbone.' + k: v for k, v in backbone.items()}
    state.update({'module.head.norm.running_mean': w.normal(5 * D, std=0.3),
                  'module.head.norm.running_var': w.normal(5 * D, std=0.1, mean=1.0).abs(),
                  'module.head.norm.num_batches_tracked': torch.tensor(1000),
                  'module.head.mlp.mlp.0.weight': w.normal(527, 5 * D, std=0.02),
                  'module.head.mlp.mlp.0.bias': w.normal(527, std=0.02)})
    return state


def clap_mlp(w: Weights) -> Any:
    """m2d_clap_vit_base-80x608p16x16-240128: M2D-CLAP (2024), MLP audio projection, text projection."""
    size, patch = [80, 608], [16, 16]
    enc = w.encoder(size, patch)
    clap = {**w.mlp('audio_proj', D, D, D), 'text_proj.weight': w.normal(D, D), 'text_proj.bias': w.normal(D),
            'logit_scale': torch.tensor(2.6593)}
    return {'model': {**norm_stats(-7.3, 4.4), **enc, **w.pretraining(enc, size, patch, 1), **clap}}


def clap_semantic(w: Weights) -> Any:
    """m2d_clap_vit_base-80x1001p16x16p16kpBpTI-2025: a RuntimeM2D state dict ('backbone.*') with the
    semantic-token audio projection, an MLP text projection and (here, a token piece of) the text encoder."""
    backbone = {**norm_stats(-7.26, 4.35), **w.encoder([80, 1001], [16, 16]), **w.semantic_proj(2),
                **w.mlp('text_proj', D, D, D)}
    state = {'backbone.' + k: v for k, v in backbone.items()}
    state['text_encoder.text_encoder.pooler.dense.bias'] = w.normal(D)
    return state


@dataclass
class Layout:
    name: str
    path: str              # folder/file as released
    build: Callable[[Weights], Any]
    seed: int
    seconds: float         # clip length of the two test clips
    sample_rate: int = 16000
    portable: dict = field(default_factory=dict)  # PortableM2D keywords
    runtime: dict = field(default_factory=dict)   # RuntimeM2D settings for the same computation
    outputs: tuple = ('encode',)                  # 'encode' [B, T, D'], 'logits' [B, C], 'clap_audio' [B, D]

    def save(self, root: Path) -> Path:
        path = Path(root) / self.path
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(self.build(Weights(self.seed)), path)
        return path

    def audio(self) -> torch.Tensor:
        """Two clips [2, seconds * sample_rate] of noise in [-0.5, 0.5]."""
        rng = np.random.default_rng(self.seed + 1000)
        return torch.from_numpy(rng.uniform(-0.5, 0.5, (2, int(self.seconds * self.sample_rate))).astype(np.float32))


LAYOUTS = [
    # The first release normalises per batch and zero-pads; the later runtime uses [-7.1, 4.2] and trims.
    Layout('first_release', 'm2d_vit_base-80x608p16x16-220930-mr7/checkpoint-300.pth', first_release, 1, 1.5,
           runtime=dict(norm_stats=[-7.1, 4.2])),
    Layout('later_p16k', 'm2d_vit_base-80x208p16x16p16k-240101-mr7/checkpoint-300.pth', later_p16k, 2, 3.0),
    Layout('as_p32k_enconly', 'm2d_as_vit_base-80x608p16x16p32k-240413_enconly/weights_ep300.pth', as_p32k_enconly,
           3, 1.5, sample_rate=32000),
    Layout('frames_40ms', 'm2d_vit_base-80x200p16x4-230529/checkpoint-300.pth', frames_40ms, 4, 2.5,
           runtime=dict(norm_stats=[-7.1, 4.2])),
    Layout('as_with_heads', 'm2d_as_vit_base-80x608p16x16-240213/checkpoint-300.pth', as_with_heads, 5, 1.5),
    Layout('evar_finetuned', 'm2d_as_vit_base-80x1001p16x16-240213_AS-FT_enconly/weights_ep69it3124-0.48494.pth',
           evar_finetuned, 6, 1.5, portable=dict(num_classes=527), runtime=dict(num_classes=527),
           outputs=('encode', 'logits')),
    Layout('clap_mlp', 'm2d_clap_vit_base-80x608p16x16-240128/checkpoint-300.pth', clap_mlp, 7, 1.5,
           portable=dict(flat_features=True), runtime=dict(flat_features=True), outputs=('encode', 'clap_audio')),
    Layout('clap_semantic', 'm2d_clap_vit_base-80x1001p16x16p16kpBpTI-2025/checkpoint-30.pth', clap_semantic, 8, 1.5,
           portable=dict(flat_features=True), runtime=dict(flat_features=True), outputs=('encode', 'clap_audio')),
]
SUBSAMPLE = 7  # every 7th feature of 'encode' and 'logits' is stored
