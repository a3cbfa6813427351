"""Checkpoint files: safe reading, atomic writing, the M2D family's state-dict layouts, the run-folder
name format, and what a checkpoint says about the model it holds.

Reading never runs code from the file: `load_checkpoint` uses torch's weights-only unpickler (with
argparse.Namespace allowed, as training checkpoints store their args). A file that needs more is
refused with UnsafeCheckpointError; load it only if you trust its source, with trust=True
(RuntimeM2D(trust_checkpoint=True), --trust_checkpoint on the command lines).

Layouts that `extract_state_dict` and `split_state` understand:
- {'model': state_dict, 'args': ..., ...} (training checkpoints) or a bare state dict, 'module.' (DDP);
- EVAR fine-tuning checkpoints: 'module.ar.runtime.backbone.*' plus the task head 'module.head.*';
- RuntimeM2D / PortableM2D state dicts: 'backbone.*' plus 'text_encoder.*', 'to_spec.*';
- the later weights' extra entries: `norm_stats`, M2D-X/AS/S `offline_predictor`, M2D-CLAP `audio_proj`,
  `text_proj` and `logit_scale` (see EXTRA_PARTS).

Folder names: `<model>-<F>x<T>p<pf>x<pt>[p<sr>[p<extra>...]][-...]`, e.g. m2d_vit_base-80x608p16x16-220930-mr7,
m2d_as_vit_base-80x608p16x16p32k-240413_enconly, m2d_clap_vit_base-80x1001p16x16p16kpBpTI-2025.
"""
import argparse
import datetime
import logging
import math
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.nn as nn

from m2d.errors import CheckpointError, CheckpointNotFoundError, UnsafeCheckpointError, UsageError
from util.atomic import save_atomic

log = logging.getLogger(__name__)

SAFE_GLOBALS = [argparse.Namespace]  # what our (and the published) training checkpoints pickle besides tensors
TRUST_OPT_IN = 'trust_checkpoint=True (--trust_checkpoint on the command lines)'
DEFAULT_NORM_STATS = (-7.1, 4.2)  # the later runtime's LMS mean/std for later-format weights that store none

FOLDER_NAME_FORMAT = ('<model>-<F>x<T>p<pf>x<pt>[p<sr>][-<date>-<conf>], e.g. m2d_vit_base-80x608p16x16-220930-mr7 '
                      'or m2d_as_vit_base-80x608p16x16p32k-240413')
_FOLDER_NAME = re.compile(r'^(?P<model>\w+?)-(?P<F>\d+)x(?P<T>\d+)p(?P<pf>\d+)x(?P<pt>\d+)'
                          r'(?:p(?P<sr>\d+k)(?P<extra>(?:p[A-Za-z0-9]+)*))?(?:-.*)?$')
# The later M2D family: M2D-AS / M2D-X / M2D-S / M2D-CLAP share M2D's encoder and predictor; their
# extra heads are EXTRA_PARTS.
_LATER_FAMILY = re.compile(r'^m2d_(?:as|x|s|clap)_vit_')
# Parts of a checkpoint besides the encoder and its pre-training decoder/target, by key prefix.
EXTRA_PARTS = {
    'offline_predictor': 'the M2D-X/AS/S offline-target predictor (pre-training only)',
    'logit_scale': "M2D-CLAP's contrastive temperature (pre-training only)",
    'audio_proj': "M2D-CLAP's audio projection",
    'text_proj': "M2D-CLAP's text projection",
    'text_encoder': "M2D-CLAP's text encoder",
    'head': 'an EVAR fine-tuning task head',
    'to_spec': 'log-mel front-end buffers (the front end is rebuilt from the settings)',
}
PRETRAINING_PREFIXES = ('decoder', 'target', 'mask_token')  # what an encoder-only model leaves out
# Bounds on what a file may ask the model to be, checked before anything is built: a crop of at most
# MAX_PATCHES patches (the published 80x608 crop has 190, a 10 s 16x4 crop 1,250) and MAX_BLOCKS blocks.
MAX_PATCHES = 16384
MAX_BLOCKS = 64
FRONT_ENDS = {  # sample-rate part of a folder name -> log-mel settings (the later runtime's)
    '16k': dict(sample_rate=16000, n_fft=400, window_size=400, hop_size=160, n_mels=80, f_min=50, f_max=8000),
    '32k': dict(sample_rate=32000, n_fft=800, window_size=800, hop_size=320, n_mels=80, f_min=50, f_max=16000),
}


# ----- reading and writing ---------------------------------------------------------------------------

def load_checkpoint(path: Union[str, Path], trust: bool = False) -> Any:
    """torch.load a checkpoint onto the CPU with the weights-only unpickler (plain tensors, containers,
    numbers, strings and argparse.Namespace). trust=True unpickles anything: only for files you trust.

    Raises CheckpointNotFoundError (no file), UnsafeCheckpointError (needs more than weights-only
    loading allows; names the object and the opt-in) or CheckpointError (not a checkpoint, or
    truncated or corrupt); never falls back to full unpickling by itself.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(f'weight file not found: {path}')
    try:
        if trust:
            return torch.load(path, map_location='cpu', weights_only=False)
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # damage surfaces as RuntimeError, EOFError, KeyError, UnpicklingError, ...
        found = re.search(r'GLOBAL ([\w.]+)', str(e)) if isinstance(e, pickle.UnpicklingError) else None
        if found:
            raise UnsafeCheckpointError(f'refused to load {path}: it holds the Python object {found[1]}, and '
                                        f"unpickling it could run code. If you trust the file's source, load it with "
                                        f'{TRUST_OPT_IN}') from None
        reason = re.search(r'WeightsUnpickler error:\s*(.+)', str(e))
        reason = reason[1] if reason else str(e).split('.')[0] or type(e).__name__
        raise CheckpointError(f'cannot read {path}: not a PyTorch checkpoint, or truncated or corrupt '
                              f'({reason.strip()})') from None


def model_state(model: nn.Module, norm_stats: Optional[Any]) -> dict[str, torch.Tensor]:
    """The state dict a training checkpoint stores: the model's, plus `norm_stats` [mean, std] (the LMS
    statistics it was trained with), as the later M2D stores them, so RuntimeM2D normalises with them."""
    state = model.state_dict()
    if norm_stats is not None:
        state['norm_stats'] = torch.tensor([float(v) for v in norm_stats])
    return state


def save_checkpoint(path: Path, model: nn.Module, optimizer, scaler, epoch: int, args, rng_states,
                    step: int = 0) -> Path:
    """checkpoint-N.pth: model (full state dict, EMA target included, with args.norm_stats), optimizer,
    epoch (= epochs done; the sampler epoch follows from it), scaler, args, and every rank's RNG states
    for an exact resume. step > 0 (checkpoint-last.pth, saved part-way through an epoch): the steps of
    epoch `epoch` + 1 done."""
    state = {'model': model_state(model, getattr(args, 'norm_stats', None)), 'optimizer': optimizer.state_dict(),
             'epoch': epoch, 'scaler': scaler.state_dict(), 'args': args, 'rng': rng_states}
    return save_atomic({**state, 'step': step} if step else state, path)


def check_norm_stats(values: Any, what: str, error: type[Exception] = CheckpointError) -> tuple[float, float]:
    """(mean, std) from a stored or given `values`: two finite numbers with std > 0, else `error` naming
    `what` (e.g. "checkpoint.pth's stored norm_stats"; UsageError for an argument)."""
    try:
        mean, std = (float(v) for v in (values.tolist() if torch.is_tensor(values) else values))
    except (TypeError, ValueError):
        mean = std = float('nan')
    if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
        raise error(f'{what} must be two finite numbers [mean, std] with std > 0, got {values!r}')
    return mean, std


def check_model_size(input_size: list[int], patch_size: list[int], what: str) -> None:
    """CheckpointError if the input holds more than MAX_PATCHES patches (frames past the last whole
    patch are not counted, as the model drops them)."""
    (F, T), (pf, pt) = input_size, patch_size
    if (F // pf) * (T // pt) > MAX_PATCHES:
        raise CheckpointError(f'{what}: input size {F}x{T} with patch size {pf}x{pt} makes '
                              f'{(F // pf) * (T // pt)} patches, more than the {MAX_PATCHES} a model may have')


def saved_args(checkpoint: Any) -> dict:
    """The training args a checkpoint stores (argparse.Namespace or dict), as a dict; {} if none."""
    args = checkpoint.get('args') if isinstance(checkpoint, dict) else None
    return dict(vars(args)) if isinstance(args, argparse.Namespace) else dict(args) if isinstance(args, dict) else {}


# ----- the folder-name format ------------------------------------------------------------------------

def parse_size(size: Union[int, str, list, tuple]) -> list[int]:
    """16 / '16' / '80x608' / [80, 608] -> [int, int] (a single number is square); both positive."""
    parts = [size] if isinstance(size, int) else size.lower().split('x') if isinstance(size, str) else list(size)
    try:
        pair = [int(v) for v in parts]
    except (TypeError, ValueError):
        pair = []
    pair = pair * 2 if len(pair) == 1 else pair
    if len(pair) != 2 or min(pair) <= 0:
        raise ValueError(f'a size must be [height, width] or "HxW" (e.g. [80, 608] or "80x608"), got {size!r}')
    return pair


@dataclass
class FolderName:
    """The parts of a run-folder name such as m2d_clap_vit_base-80x1001p16x16p16kpBpTI-2025."""
    model: str
    input_size: list[int]
    patch_size: list[int]
    sr: str = ''  # sample-rate part ('16k', '32k'); '' when absent (16 kHz)
    extra: list[str] = field(default_factory=list)  # parts after the sample rate, e.g. ['B', 'TI']


def parse_folder_name(name: str) -> Optional[FolderName]:
    """'m2d_vit_base-80x608p16x16p32k-240413' -> FolderName('m2d_vit_base', [80, 608], [16, 16], '32k'); None
    when the name does not follow FOLDER_NAME_FORMAT."""
    m = _FOLDER_NAME.match(name)
    if not m:
        return None
    return FolderName(m['model'], [int(m['F']), int(m['T'])], [int(m['pf']), int(m['pt'])], m['sr'] or '',
                      (m['extra'] or '').split('p')[1:])


def short_conf(args: argparse.Namespace) -> str:
    """'mr7' for mask ratio 0.7, 'mr75' for 0.75 (the published folder suffix)."""
    return 'mr' + f'{args.mask_ratio:g}'.split('.')[-1]


def model_tag(args: argparse.Namespace) -> str:
    """e.g. m2d_vit_base-80x608p16x16: the model, input size and patch size part of a run-folder name."""
    (F, T), (pf, pt) = args.input_size, args.patch_size
    return f'{args.model}-{F}x{T}p{pf}x{pt}'


def run_name(args: argparse.Namespace, date: Optional[datetime.date] = None) -> str:
    """e.g. m2d_vit_base-80x608p16x16-220930-mr7 (the published run-folder name)."""
    date = date or datetime.date.today()
    return f'{model_tag(args)}-{date:%y%m%d}-{short_conf(args)}'


# ----- state-dict layouts ----------------------------------------------------------------------------

def extract_state_dict(checkpoint: Any, path: Union[str, Path]) -> dict[str, torch.Tensor]:
    """The flat state dict of any layout in the module docstring, with the wrappers' prefixes removed
    ('module.', EVAR's 'ar.runtime.', RuntimeM2D's 'backbone.'); other parts keep their names."""
    state = checkpoint.get('model', checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not state or not all(torch.is_tensor(v) for v in state.values()):
        keys = list(checkpoint)[:8] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise CheckpointError(f'{path} holds no model state dict (expected {{"model": state_dict, ...}} or a bare '
                              f'state dict; found {keys})')
    if all(k.startswith('module.') for k in state):  # saved from a DDP/DataParallel-wrapped model
        state = {k.removeprefix('module.'): v for k, v in state.items()}
    for wrapper in ('ar.runtime.', 'backbone.'):  # EVAR's audio representation, then RuntimeM2D
        if any(k.startswith(wrapper) for k in state):
            state = {k.removeprefix(wrapper): v for k, v in state.items()}
    if 'norm_stats' in state:
        check_norm_stats(state['norm_stats'], f"{path}'s stored norm_stats")
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        shown = ', '.join(bad[:5]) + (' ...' if len(bad) > 5 else '')
        raise CheckpointError(f'{path} holds NaN or inf values in {len(bad)} tensors ({shown}): a diverged or '
                              'damaged run; use an earlier checkpoint')
    return state


@dataclass
class CheckpointParts:
    """A state dict split into what the backbone loads, the stored LMS stats, and EXTRA_PARTS."""
    model: dict[str, torch.Tensor]
    norm_stats: Optional[tuple[float, float]] = None
    extra: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # part -> its state, prefix removed

    def describe_extra(self) -> str:
        return ', '.join(f'{name} ({EXTRA_PARTS[name]})' for name in self.extra)


def split_state(state: dict[str, torch.Tensor]) -> CheckpointParts:
    """Split an extract_state_dict result into the backbone's state, `norm_stats` and EXTRA_PARTS."""
    parts = CheckpointParts({})
    for key, value in state.items():
        prefix = key.split('.')[0]
        if key == 'norm_stats':
            parts.norm_stats = (float(value[0]), float(value[1]))
        elif prefix in EXTRA_PARTS:
            parts.extra.setdefault(prefix, {})[key[len(prefix) + 1:]] = value
        else:
            parts.model[key] = value
    return parts


def count_blocks(state: dict, prefix: str) -> int:
    """Number of `prefix.N.*` blocks in a state dict (0 if none)."""
    indices = {int(k.split('.')[1]) for k in state if k.startswith(prefix + '.') and k.split('.')[1].isdigit()}
    return max(indices) + 1 if indices else 0


def load_state_strict(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """load_state_dict(strict=True), raising CheckpointError (one line) that lists every missing,
    unexpected and mis-shaped key."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [f'{k}: checkpoint {list(state[k].shape)} vs model {list(own[k].shape)}'
                  for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        def listing(title, keys):
            return f'; {title} ({len(keys)}): ' + ', '.join(keys[:12]) + (' ...' if len(keys) > 12 else '')
        raise CheckpointError(f'the checkpoint does not match {what}'
                              + (listing('missing keys', missing) if missing else '')
                              + (listing('unexpected keys', unexpected) if unexpected else '')
                              + (listing('shape mismatches', mismatched) if mismatched else '')
                              + '; check the model name and sizes (checkpoint args, folder name or explicit '
                                'arguments)')
    model.load_state_dict(state)


# ----- what a checkpoint describes -------------------------------------------------------------------

def backbone_model(name: str) -> str:
    """The factory name that builds a model's backbone: the later M2D family's variants
    (m2d_as_vit_base, m2d_clap_vit_base, ...) have M2D's (m2d_vit_base)."""
    return _LATER_FAMILY.sub('m2d_vit_', name)


@dataclass
class ModelSpec:
    """A checkpoint's model, settled from explicit arguments > the checkpoint (its stored args and
    weights) > its folder name; `sources` says where each field came from."""
    model: str
    input_size: list[int]
    patch_size: list[int]
    depth: Optional[int] = None          # encoder blocks; None: the model's default (random weights)
    decoder_depth: Optional[int] = None  # decoder/predictor blocks; 0: the checkpoint has none
    sr: str = '16k'                      # sample-rate part: the log-mel front end (FRONT_ENDS)
    norm_stats: Optional[tuple[float, float]] = None  # fixed LMS mean/std given or stored with the weights
    later_format: bool = False           # saved by the later M2D trainers (norm_stats, sample-rate part, ...)
    extra_parts: list[str] = field(default_factory=list)  # EXTRA_PARTS found in the checkpoint
    name_extra: list[str] = field(default_factory=list)   # folder-name parts after the sample rate
    sources: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        def show(key):
            return f'{key} {getattr(self, key)} ({self.sources.get(key, "default")})'
        return ', '.join(show(k) for k in ('model', 'input_size', 'patch_size', 'depth', 'decoder_depth', 'sr',
                                           'norm_stats'))


def describe(path: Union[str, Path], checkpoint: Any = None, parts: Optional[CheckpointParts] = None,
             model: str = '', input_size=None, patch_size=None, depth: Optional[int] = None,
             decoder_depth: Optional[int] = None, sr: str = '', norm_stats=None) -> ModelSpec:
    """Settle what `path` holds (parts=None: random weights named like `.../<folder>/random`).

    Each field comes from the explicit argument when given, else from the checkpoint (its stored
    training args; block counts and norm_stats from its weights), else from the folder name (for
    random weights also the file name). Raises CheckpointError when the model or a size is unknown.
    """
    path = Path(path)
    args = saved_args(checkpoint)
    names = [path.name, path.parent.name] if parts is None else [path.parent.name, path.stem]
    name = next((n for n in map(parse_folder_name, names) if n), None)
    sources = {}

    def settle(key, explicit, from_checkpoint, from_name):
        for value, source in ((explicit, 'argument'), (from_checkpoint, 'checkpoint'), (from_name, 'folder name')):
            if value not in (None, '', []):
                sources[key] = source
                return value
        return None

    spec_model = settle('model', model, args.get('model'), name and name.model)
    sizes = [settle(key, explicit, args.get(key), name and getattr(name, key))
             for key, explicit in (('input_size', input_size), ('patch_size', patch_size))]
    if not spec_model or None in sizes:
        missing = ', '.join(k for k, v in (('model', spec_model), ('input_size', sizes[0]), ('patch_size', sizes[1]))
                            if not v)
        raise CheckpointError(
            f'cannot tell the {missing} of {path}: the checkpoint stores no training args that say it, and the folder '
            f'name {path.parent.name!r} does not follow {FOLDER_NAME_FORMAT}. Rename the folder, or give them '
            "explicitly: RuntimeM2D(weight_file=..., model='m2d_vit_base', input_size=[80, 608], patch_size=[16, 16]) "
            '(command lines: --model m2d_vit_base --input_size 80x608 --patch_size 16x16)')
    state = parts.model if parts else {}
    try:
        spec = ModelSpec(spec_model, *(parse_size(s) for s in sizes), sources=sources)
    except ValueError as e:
        raise CheckpointError(f'{path}: {e}') from None
    check_model_size(spec.input_size, spec.patch_size, str(path))
    spec.depth = settle('depth', depth, count_blocks(state, 'blocks') or args.get('depth'), None)
    spec.decoder_depth = settle('decoder_depth', decoder_depth,
                                count_blocks(state, 'decoder_blocks') if parts else args.get('decoder_depth'), None)
    for key in ('depth', 'decoder_depth'):
        value = getattr(spec, key)
        if value is not None and not (isinstance(value, int) and 0 <= value <= MAX_BLOCKS):
            raise CheckpointError(f'{path}: {key} {value!r} ({sources[key]}) must be a whole number up to {MAX_BLOCKS}')
    spec.sr = settle('sr', sr, args.get('sr'), name and name.sr) or '16k'
    if spec.sr not in FRONT_ENDS:
        raise CheckpointError(f'unknown sample-rate part {spec.sr!r} for {path}; known: {", ".join(FRONT_ENDS)}')
    stats = settle('norm_stats', norm_stats, parts and parts.norm_stats, None)
    spec.norm_stats = None if stats is None else check_norm_stats(stats, 'norm_stats', UsageError)
    spec.later_format = bool((parts and parts.norm_stats) or args.get('sr') or (name and name.sr)
                             or _LATER_FAMILY.match(spec.model))
    spec.extra_parts = list(parts.extra) if parts else []
    spec.name_extra = name.extra if name else []
    return spec
