"""Continuing a run: every process's RNG state, restoring a checkpoint (--resume), and starting a new run
from released or earlier weights (--init_from)."""
import random
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
import torch.nn as nn

from m2d.checkpoint import PRETRAINING_PREFIXES, extract_state_dict, load_checkpoint, load_state_strict, split_state
from m2d.errors import CheckpointError, M2DError, UsageError
from m2d.model.vit import MaskedAutoencoderViT
from m2d.train.config import TrainConfig
from util.dist import DistInfo


def rng_state() -> dict[str, Any]:
    """This process's torch / CUDA / numpy / python RNG states, as checkpoint-safe (weights-only) types."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {'torch': torch.get_rng_state(),
            'cuda': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            'numpy': (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
            'python': random.getstate()}

def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state['torch'])
    if state['cuda'] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])
    name, keys, pos, has_gauss, cached = state['numpy']
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state['python']
    random.setstate((version, tuple(internal), gauss))

def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)

def resume_from(checkpoint: dict, config: TrainConfig, info: DistInfo, model: nn.Module,
                optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, print_fn: Callable[[str], None]) -> int:
    """Restore weights, optimizer, scaler and this rank's RNG from a checkpoint; -> epochs done."""
    try:
        parts = split_state(extract_state_dict(checkpoint, config.resume))
        load_state_strict(model, parts.model, f'--model {config.model} --input_size {config.input_size} '
                                              f'--depth {config.depth} --decoder_depth {config.decoder_depth}')
    except CheckpointError as e:
        raise UsageError(f'--resume {config.resume}: {e}') from None
    if parts.extra:
        print_fn(f'Note: {config.resume} also holds {parts.describe_extra()}; this model does not use them')
    if 'optimizer' not in checkpoint:  # e.g. released weights: continue from them with a fresh optimizer
        print_fn(f'Note: {config.resume} holds weights only; the optimizer starts afresh at epoch {config.start_epoch}')
        return config.start_epoch
    optimizer.load_state_dict(checkpoint['optimizer'])
    if checkpoint.get('scaler'):
        scaler.load_state_dict(checkpoint['scaler'])
    states = checkpoint.get('rng') or []
    if len(states) == info.world_size:
        set_rng_state(states[info.rank])
    else:
        print_fn(f'Note: RNG states not restored (saved by {len(states)} processes, now {info.world_size})')
    epochs_done = int(checkpoint['epoch'])
    print_fn(f'Resumed from {config.resume}: {epochs_done} epochs done')
    return epochs_done

def load_initial_weights(model: MaskedAutoencoderViT, path: str, trust: bool, print_fn: Callable[[str], None]) -> None:
    """Start `model` from the weights in `path` (--init_from). The encoder must match; the predictor and
    the EMA target come from the checkpoint when it has them, else the predictor keeps its fresh init and
    the target starts as a copy of the encoder. Position tables are the model's own: they are fixed
    functions of the patch grid, so a crop length other than the checkpoint's works too."""
    try:
        parts = split_state(extract_state_dict(load_checkpoint(path, trust=trust), path))
    except M2DError as e:
        raise UsageError(f'--init_from: {e}') from None
    own = model.state_dict()
    state = {k: v for k, v in parts.model.items() if not k.endswith('pos_embed')}
    encoder = [k for k in own if not k.startswith(PRETRAINING_PREFIXES) and not k.endswith('pos_embed')]
    missing = [k for k in encoder if k not in state]
    if missing:
        raise UsageError(f'--init_from {path}: the checkpoint lacks encoder weights of {model_text(model)}: '
                         + ', '.join(missing[:8]) + (' ...' if len(missing) > 8 else ''))
    copied_target = hasattr(model, 'target_blocks') and not any(k.startswith('target_') for k in state)
    if copied_target:
        state.update({'target_' + k: v for k, v in state.items() if k.startswith(('blocks.', 'norm.'))})
    fresh = [k for k in own if k not in state]
    try:
        load_state_strict(model, {**state, **{k: own[k] for k in fresh}}, model_text(model))
    except CheckpointError as e:
        raise UsageError(f'--init_from {path}: {e}') from None
    predictor = 'fresh' if any(k.startswith('decoder_blocks.') for k in fresh) else 'from the checkpoint'
    target = 'a copy of the encoder' if copied_target else 'from the checkpoint'
    unused = f'; not used: {parts.describe_extra()}' if parts.extra else ''
    print_fn(f'Initialised from {path}: encoder ({len(model.blocks)} blocks) from the checkpoint, predictor '
             f'{predictor}, target {target}{unused}; the optimizer and schedules start afresh')

def model_text(model: MaskedAutoencoderViT) -> str:
    return f'{type(model).__name__} (input {list(model.patch_embed.img_size)}, patch {list(model.patch_size())}, ' \
           f'{len(model.blocks)} blocks)'

def resume_hint(epoch: int, last_checkpoint: Optional[Union[str, Path]]) -> str:
    """What to do after a Ctrl-C in `epoch` (1-based)."""
    if last_checkpoint is None:
        return f'in epoch {epoch}, before the first checkpoint; run the same command again to start over'
    return f'in epoch {epoch}; the last checkpoint is {last_checkpoint}: run the same command with ' \
           f'--resume {last_checkpoint} to continue from it'
