"""Building RuntimeM2D's network from a weight file: settle what the file holds (m2d.checkpoint.describe),
create the backbone, load it strictly; the position tables for another width; EVAR's task head."""
import logging
from pathlib import Path

import torch
import torch.nn as nn
from timm.layers import resample_abs_pos_embed

from m2d.checkpoint import (
    PRETRAINING_PREFIXES,
    CheckpointParts,
    ModelSpec,
    backbone_model,
    describe,
    extract_state_dict,
    load_checkpoint,
    load_state_strict,
    split_state,
)
from m2d.errors import CheckpointError
from m2d.model.vit import MaskedAutoencoderViT, create_model
from m2d.runtime.config import Config

log = logging.getLogger(__name__)


def adapt_positions(pos_embed: torch.Tensor, grid_f: int, width: int) -> torch.Tensor:
    """pos_embed [1, 1 + grid_f * T', D] -> [1, 1 + grid_f * width, D]: the first `width` patch columns,
    or bicubic resampling to more of them (as the later runtime's dur_frames)."""
    cls, tokens = pos_embed[:, :1], pos_embed[:, 1:]
    old_width = tokens.shape[1] // grid_f
    if width <= old_width:
        tokens = tokens.reshape(1, grid_f, old_width, -1)[:, :, :width].reshape(1, grid_f * width, -1)
        return torch.cat([cls, tokens], dim=1)
    return resample_abs_pos_embed(pos_embed, [grid_f, width], [grid_f, old_width], antialias=False)


def build_backbone(cfg: Config) -> tuple[MaskedAutoencoderViT, ModelSpec, CheckpointParts]:
    """Settle the model cfg names (see m2d.checkpoint.describe), create it and load its weights.

    Fills cfg.model/input_size/patch_size/sr. Encoder and decoder depths follow the checkpoint; a
    checkpoint without decoder weights (or cfg.encoder_only, or cfg.dur_frames) gives an encoder-only
    model. -> (model, spec, the checkpoint's parts; those besides the backbone are the caller's).
    """
    path = Path(cfg.weight_file)
    random_weights = path.name.endswith('random')
    checkpoint = None if random_weights else load_checkpoint(path, trust=cfg.trust_checkpoint)
    parts = None if random_weights else split_state(extract_state_dict(checkpoint, path))
    spec = describe(path, checkpoint, parts, model=cfg.model, input_size=cfg.input_size, patch_size=cfg.patch_size,
                    depth=cfg.depth, decoder_depth=cfg.decoder_depth, sr=cfg.sr, norm_stats=cfg.norm_stats)
    cfg.model, cfg.input_size, cfg.patch_size, cfg.sr = spec.model, spec.input_size, spec.patch_size, spec.sr
    cfg.encoder_only = bool(cfg.encoder_only or cfg.dur_frames or spec.decoder_depth == 0)
    kwargs = dict(img_size=list(cfg.input_size), patch_size=cfg.patch_size, encoder_only=cfg.encoder_only)
    kwargs.update({k: v for k, v in (('depth', spec.depth), ('decoder_depth', spec.decoder_depth)) if v})
    state = None if parts is None else parts.model
    if random_weights:
        log.warning('Random weights: %s', path)
    elif cfg.encoder_only:
        state = {k: v for k, v in state.items() if not k.startswith(PRETRAINING_PREFIXES)}
    if cfg.dur_frames:
        grid_f, width = cfg.input_size[0] // cfg.patch_size[0], int(cfg.dur_frames) // cfg.patch_size[1]
        if state is not None:
            state['pos_embed'] = adapt_positions(state['pos_embed'], grid_f, width)
        cfg.input_size = kwargs['img_size'] = [cfg.input_size[0], int(cfg.dur_frames)]
    try:
        model = create_model(backbone_model(cfg.model), **kwargs)
    except ValueError as e:  # an unknown model name, from the folder name or the stored args
        raise CheckpointError(f'{path}: {e}') from None
    if state is not None:
        load_state_strict(model, state, f'{cfg.model}(input {cfg.input_size}, patch {cfg.patch_size}, '
                                        f'{len(model.blocks)} blocks{", encoder only" if cfg.encoder_only else ""})')
    log.info('Model: %s', spec)
    return model.eval(), spec, parts or CheckpointParts({})


class TaskHead(nn.Module):
    """EVAR's linear task head: clip embeddings [B, D] -> BatchNorm1d (no affine) -> Linear -> logits [B, C]."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.norm = nn.BatchNorm1d(dim, affine=False)
        self.linear = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.linear.weight, std=2e-5)
        nn.init.zeros_(self.linear.bias)

    def load_evar(self, state: dict[str, torch.Tensor]) -> None:
        """Load an EVAR fine-tuning head ('head.norm.*', 'head.mlp.mlp.0.*' with the prefix removed)."""
        load_state_strict(self, {k.replace('mlp.mlp.0.', 'linear.'): v for k, v in state.items()},
                          f'the task head ({self.linear.in_features} -> {self.linear.out_features}; EVAR linear head)')

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(x))

