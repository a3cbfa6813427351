"""Pre-training driver behind train_audio.py (M2D; also `m2d train`) and mae_train_audio.py (MSM-MAE).

    python train_audio.py --dataset data/files_audioset.csv            # one process
    torchrun --nproc_per_node 4 train_audio.py --dataset ...           # DDP, 4 GPUs

A run writes to one folder (named `{model}-{F}x{T}p{pf}x{pt}-{YYMMDD}-mr{ratio}` unless --output_dir
is given): checkpoint-{epoch}.pth, log.txt (a JSON line per epoch), console.txt (a copy of stdout),
TensorBoard events, vis-{epoch}.png, and the logs of the evaluation scripts it starts.
"""
import argparse
import contextlib
import datetime
import errno
import io
import json
import math
import os
import random
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, TextIO, Union

import numpy as np
import torch
import torch.nn as nn
from timm.optim import param_groups_weight_decay
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from torch.utils.tensorboard import SummaryWriter

from util import dist as distutil
from util.atomic import open_atomic, remove_stale_temp_files, save_atomic
from util.cpu import idle_cores, usable_cores
from util.schedules import scaled_lr

from .checkpoint import (MAX_BLOCKS, PRETRAINING_PREFIXES, CheckpointError, check_model_size, check_norm_stats, backbone_model, describe, extract_state_dict,
                         load_checkpoint, load_state_strict, parse_size, run_name, save_checkpoint, saved_args,
                         split_state)
from .cli import (LOAD_ERRORS, HelpFormatter, Interrupted, OutputError, UsageError, add_norm_stats_argument,
                  check_writable, guarded, parse_norm_stats, parse_numbers, writing)
from .data import (NORM_STATS_CROPS, BackgroundNoise, SpectrogramDataset, check_files, compute_norm_stats,
                   load_vis_samples, published_norm_stats, read_file_list)
from .engine_pretrain import AMP_DTYPES, NonFiniteLossError, Precision, RunClock, Schedule, train_one_epoch
from .models_mae import MODELS, MaskedAutoencoderViT, create_model
from .run_folder import RunFolderError, check_ownership, checkpoint_epochs, in_use, move_aside, run_lock
from .visualize import save_loss_curve, save_mask_figure

REPO = Path(__file__).resolve().parents[1]  # train_audio.py, quick_eval.sh and all_eval.sh in a checkout


# ----- arguments -------------------------------------------------------------------------------------

# Recipes for --preset: values for the flags a command line does not give. 'small' was chosen by the sweeps
# of bench/bench_learning.py (README, "Pre-training on small data"): on 1,000 clips, a longer EMA horizon
# helps, and 40 ms patches (16x4, as the later p16x4 weights) on 0.64 s crops learn more than 160 ms
# patches (16x16) on 1.1 or 2.1 s crops, most on speech, at about twice the CPU time of the 1.1 s ones.
PRESETS = {
    'small': dict(model='m2d_vit_tiny', depth=4, decoder_depth=2, input_size=[80, 64], patch_size=[16, 4],
                  batch_size=16, epochs=60, warmup_epochs=5, blr=1e-2, ema_decay_init=0.999, ema_decay=0.9999,
                  mask_ratio=0.5),
}
PUBLISHED_BATCH_SIZE = 512
PUBLISHED_NUM_WORKERS = 10
PUBLISHED_WARMUP_SHARE = 20 / 300  # --warmup_epochs 20 of --epochs 300


def size_arg(text: str) -> list[int]:
    """argparse type: '80x208' -> [80, 208]; '16' -> [16, 16]."""
    try:
        return parse_size(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected a size like 80x208, got {text!r}') from None


def get_args_parser(mae: bool = False) -> argparse.ArgumentParser:
    """The train_audio.py flags (published names and defaults); mae=True: mae_train_audio.py (MSM-MAE)."""
    p = argparse.ArgumentParser('MSM-MAE pre-training' if mae else 'M2D pre-training', description=__doc__,
                                formatter_class=HelpFormatter)
    add_arguments(p, mae)
    return p


def add_arguments(p: argparse.ArgumentParser, mae: bool = False) -> None:
    """Add the pre-training options to `p` (M2D's defaults; mae=True: MSM-MAE's)."""
    p.add_argument('--batch_size', default=None, type=int,
                   help='batch size per process (GPU); default 512, or fewer when the dataset has fewer files')
    p.add_argument('--epochs', default=300, type=int, help='length of the run (the lr and EMA schedules span it)')
    p.add_argument('--accum_iter', default=1, type=int, help='gradient accumulation steps per update')
    p.add_argument('--eval_after', default=100, type=int, help='run quick_eval.sh on checkpoints from this epoch on')
    p.add_argument('--save_freq', default=100, type=int, help='save a checkpoint every N epochs (and at the end)')
    p.add_argument('--stop_at', default=-1, type=int, help='stop after this epoch, keeping the --epochs schedules '
                                                           '(-1: run all --epochs)')
    p.add_argument('--print_freq', default=20, type=int, help='progress line every N steps')
    # Model.
    p.add_argument('--model', default='msm_mae_vit_base' if mae else 'm2d_vit_base', choices=sorted(MODELS),
                   help='architecture')
    p.add_argument('--depth', default=None, type=int, help='encoder depth (default 12; small for demos)')
    p.add_argument('--decoder_depth', default=4 if mae else 8, type=int, help='decoder (predictor) blocks')
    p.add_argument('--input_size', default='80x208', type=size_arg, help='F x T of a training crop')
    p.add_argument('--patch_size', default='16x16', type=size_arg, help='F x T of a patch')
    p.add_argument('--mask_ratio', default=0.75 if mae else 0.7, type=float, help='ratio of patches masked')
    p.add_argument('--mask_span', default=0, type=int,
                   help='mask whole time columns in runs of this many patches (span masking, as wav2vec 2.0; '
                        '0 = any patches, as published)')
    p.add_argument('--mask_span_share', default=1.0, type=float,
                   help='with --mask_span: the share of samples span-masked; the others are masked anywhere')
    if mae:
        p.add_argument('--norm_pix_loss', action='store_true', help='per-patch normalised pixels as targets')
    else:
        p.add_argument('--no_norm_pix_loss', action='store_false', dest='norm_pix_loss',
                       help='do not standardise the target representations')
        p.add_argument('--ema_decay_init', default=0.99995, type=float, help='EMA decay of the target at the start')
        p.add_argument('--ema_decay', default=0.99999, type=float, help='EMA decay at the end (linear in between)')
        p.add_argument('--loss_fn', default='norm_mse', choices=['norm_mse', 'mse'],
                       help='norm_mse: MSE of L2-normalised vectors; mse: plain MSE')
        p.add_argument('--target_layers', default=[], type=lambda s: parse_numbers(s, int),
                       help="average these target blocks' outputs, e.g. '[8,9,10,11]' (default: the last block)")
    p.add_argument('--compile', action='store_true', help='torch.compile the model')
    # Optimizer.
    p.add_argument('--optim', default='adamw', choices=['adamw', 'sgd'], help='AdamW (0.9, 0.95) or SGD (momentum 0.9)')
    p.add_argument('--weight_decay', default=0.05, type=float, help='weight decay (not on biases and 1-D parameters)')
    p.add_argument('--clip_grad', default=0.0, type=float,
                   help='clip the gradient norm at this value; 0 = off (default: off, as the published runs, whose '
                        'train_audio.py parses --clip_grad 3.0 but never applies it)')
    p.add_argument('--amp', default=None, choices=sorted(AMP_DTYPES),
                   help='mixed precision: fp16 (autocast with a dynamic loss scaler), bf16, or none (fp32) '
                        '(default: fp16 on CUDA, as published; none on the CPU)')
    p.add_argument('--lr', default=None, type=float, help='absolute lr (default: blr * effective batch / 256)')
    p.add_argument('--blr', default=3e-4, type=float, help='base lr for an effective batch of 256')
    p.add_argument('--min_lr', default=0.0, type=float, help='lr at the end of the half-cosine decay')
    p.add_argument('--warmup_epochs', default=20, type=float, help='linear lr warm-up, in epochs')
    # Data.
    p.add_argument('--data_path', default='data', type=str, help='folder the CSV paths are relative to')
    p.add_argument('--dataset', default='data/files_audioset.csv', type=str, help="CSV with a 'file_name' column")
    add_norm_stats_argument(p, help='mean and std of the LMS (default: measured on 10,000 random crops at start)')
    p.add_argument('--skip_missing', action='store_true',
                   help='drop missing, corrupt or NaN/inf-holding files instead of failing')
    p.add_argument('--noise_ratio', default=0.0, type=float,
                   help='mix each crop with a random background crop at this power share (0 = off; the later '
                        "M2D's background-noise mixing, a regulariser for small data)")
    p.add_argument('--csv_bg_noise', default='', type=str,
                   help='file list of the background crops, relative to --data_path (default: the --dataset files)')
    p.add_argument('--num_workers', default=None, type=int,
                   help='DataLoader worker processes per training process (default: on CUDA 10, the published '
                        'value, or the cores each process has if fewer; on the CPU 0, loading in the training process)')
    p.add_argument('--pin_mem', action='store_true', help='pin CPU memory in the DataLoader (on by default)')
    p.add_argument('--no_pin_mem', action='store_false', dest='pin_mem', help='do not pin CPU memory')
    p.set_defaults(pin_mem=True)
    # Run.
    p.add_argument('--output_dir', default='', type=str, help='run folder (default: named after the settings)')
    p.add_argument('--log_dir', default='', type=str, help='TensorBoard folder (default: the run folder)')
    p.add_argument('--device', default='auto', type=str, help="'cuda', 'cpu', or 'auto': cuda if available, else cpu")
    p.add_argument('--threads', default=0, type=int,
                   help='torch threads per process (0: torch\'s default when OMP_NUM_THREADS is set or on CUDA, '
                        'else the cores that other processes leave idle)')
    p.add_argument('--seed', default=0, type=int, help='seed of the weights, data order, crops and masks')
    p.add_argument('--published_data', action='store_true',
                   help="the published code's data quirks, for comparison with its runs: on one process the "
                        'epoch-1 order every epoch, sampler seed 0 whatever --seed, the last batch padded, and '
                        'without --norm_stats the statistics of 10,000 crops drawn with replacement on each process '
                        '(docs/differences.md)')
    p.add_argument('--resume', default='', type=str,
                   help='checkpoint to continue from, in its own run folder; what it stores of the model and the '
                        'optimisation fills the flags not given (' + ', '.join(RESUMED_ARGS) + '); everything else '
                        '(paths, data, devices, workers, evaluation) comes from the command line and the defaults')
    p.add_argument('--overwrite', action='store_true',
                   help='start a new run in a folder that holds checkpoints of an earlier one (or resume from an '
                        'earlier checkpoint than its latest): its files are moved into previous-<date>-<time>/')
    p.add_argument('--trust_checkpoint', action='store_true',
                   help='let --resume unpickle anything in the file (it could run code): only for files you trust')
    p.add_argument('--start_epoch', default=0, type=int, help='first epoch (set from the checkpoint on --resume)')
    p.add_argument('--init_from', default='', type=str,
                   help='start a new run from the weights of this checkpoint (further pre-training, e.g. released '
                        "weights on your own data): its model and sizes fill the flags not given, the optimizer "
                        'and schedules start afresh')
    p.add_argument('--preset', default='', choices=['', *PRESETS],
                   help='a recipe filling the flags not given: small = the small-data recipe of the README '
                        '(bench/bench_learning.py)')
    p.add_argument('--eval_scripts', default='', type=str,
                   help='folder of quick_eval.sh / all_eval.sh (default: the folder of the training script)')
    # Distributed (torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; these are kept for compatibility).
    p.add_argument('--world_size', default=1, type=int, help='set by torchrun (WORLD_SIZE)')
    p.add_argument('--local_rank', '--local-rank', default=-1, type=int, help='set by torchrun (LOCAL_RANK)')
    p.add_argument('--dist_url', default='env://', help='process-group rendezvous')


# What a resumed run takes from its checkpoint's stored args (for the flags not given): the model and the
# optimisation only. Never programs, paths, devices or workers: a checkpoint is data, often someone else's.
RESUMED_ARGS = ('model', 'depth', 'decoder_depth', 'input_size', 'patch_size', 'mask_ratio', 'mask_span',
                'mask_span_share', 'norm_pix_loss', 'ema_decay_init', 'ema_decay', 'loss_fn', 'target_layers',
                'optim', 'weight_decay', 'clip_grad', 'lr', 'blr', 'min_lr', 'warmup_epochs', 'epochs',
                'batch_size', 'accum_iter', 'norm_stats', 'noise_ratio', 'seed', 'save_freq', 'amp',
                'published_data')
# Stored settings a user might expect a resume to carry on; a note names those that differ.
NOTED_IF_NOT_RESUMED = ('data_path', 'dataset', 'csv_bg_noise', 'skip_missing', 'log_dir', 'eval_scripts',
                        'eval_after', 'device', 'compile')


def explicit_flags(parser: argparse.ArgumentParser, argv: Optional[list[str]]) -> set[str]:
    """The destinations of the flags given on the command line: `parser` (a fresh one) parses argv
    again with its defaults removed, so only what was given is set."""
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    parser._defaults.clear()
    return set(vars(parser.parse_known_args(argv)[0]))


def parse_args(argv: Optional[list[str]] = None, mae: bool = False) -> argparse.Namespace:
    """Parse the command line of train_audio.py (mae=True: mae_train_audio.py); see complete_args."""
    return complete_args(get_args_parser(mae).parse_args(argv), argv, mae)


def complete_args(args: argparse.Namespace, argv: Optional[list[str]], mae: bool = False) -> argparse.Namespace:
    """Fill the flags not given on the command line `argv`, in this order: from --preset's recipe; from
    --init_from's checkpoint, its model and sizes (and the LMS stats it stores or was trained with);
    from --resume's checkpoint, what it stores of the model and the optimisation (RESUMED_ARGS).

    So `--resume RUN/checkpoint-N.pth` alone continues the run as it was started, and any flag given
    (e.g. --epochs 400) overrides the stored one. lr is derived again from --blr when a flag it
    depends on (--blr, --batch_size, --accum_iter) is given without --lr. A new run from --init_from
    whose warm-up would span the whole run gets the published share of it (20 of 300 epochs) instead.
    Every value taken from a file is checked as the flag would be.
    """
    if not (args.preset or args.init_from or args.resume):
        return args
    parser = get_args_parser(mae)
    given = explicit_flags(get_args_parser(mae), argv)

    def fill(values: dict) -> None:
        for key, value in values.items():
            if hasattr(args, key) and key not in given and value is not None:
                setattr(args, key, value)

    fill(PRESETS.get(args.preset, {}))
    if args.init_from:
        fill(stored_settings(initial_model_args(args.init_from, args.trust_checkpoint), parser,
                             f'--init_from {args.init_from}'))
        if 'warmup_epochs' not in given and 'warmup_epochs' not in PRESETS.get(args.preset, {}) \
                and args.warmup_epochs >= args.epochs:
            args.warmup_epochs = args.epochs * PUBLISHED_WARMUP_SHARE
    if args.resume:
        try:
            stored = saved_args(load_checkpoint(args.resume, trust=args.trust_checkpoint))
        except LOAD_ERRORS as e:
            raise UsageError(f'--resume: {e}') from None
        fill(stored_settings({k: v for k, v in stored.items() if k in RESUMED_ARGS}, parser, f'--resume {args.resume}'))
    if given & {'blr', 'batch_size', 'accum_iter'} and 'lr' not in given:
        args.lr = None
    return args


def stored_settings(values: dict, parser: argparse.ArgumentParser, source: str) -> dict:
    """Settings a checkpoint stores, as the flags would give them: strings (older files) through the
    flag's own type, then check_settings; None values are dropped. source: e.g. '--resume PATH'."""
    types = {a.dest: a.type for a in parser._actions}
    values = {k: v for k, v in values.items() if v is not None}
    try:
        for key, value in values.items():
            if isinstance(value, str) and callable(types.get(key)):
                values[key] = types[key](value)
            elif isinstance(value, str) and key == 'norm_stats':
                values[key] = parse_norm_stats(value)
    except (argparse.ArgumentTypeError, ValueError) as e:
        raise UsageError(f'{source}: its stored {key} is not valid: {e}') from None
    check_settings(values, lambda key: f'{source}: its stored {key}')
    return values


def initial_model_args(path: str, trust: bool) -> dict:
    """What --init_from's checkpoint says about its model: name, sizes, depths, and the LMS stats it
    stores (later formats) or was pre-trained with (our training args)."""
    try:
        checkpoint = load_checkpoint(path, trust=trust)
        spec = describe(path, checkpoint, split_state(extract_state_dict(checkpoint, path)))
    except LOAD_ERRORS as e:
        raise UsageError(f'--init_from: {e}') from None
    stats = spec.norm_stats or saved_args(checkpoint).get('norm_stats')
    return dict(model=backbone_model(spec.model), input_size=spec.input_size, patch_size=spec.patch_size,
                depth=spec.depth, decoder_depth=spec.decoder_depth or None, norm_stats=stats)


def load_initial_weights(model: MaskedAutoencoderViT, path: str, trust: bool, print_fn: Callable[[str], None]) -> None:
    """Start `model` from the weights in `path` (--init_from). The encoder must match; the predictor and
    the EMA target come from the checkpoint when it has them, else the predictor keeps its fresh init and
    the target starts as a copy of the encoder. Position tables are the model's own: they are fixed
    functions of the patch grid, so a crop length other than the checkpoint's works too."""
    try:
        parts = split_state(extract_state_dict(load_checkpoint(path, trust=trust), path))
    except LOAD_ERRORS as e:
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


def is_m2d(model_name: str) -> bool:
    return model_name.startswith('m2d')


def unused_folder(name: str) -> Path:
    """`name`, or `name-2`, `name-3`, ... if an earlier run saved checkpoints there or a run is using it."""
    path, n = Path(name), 1
    while checkpoint_epochs(path) or in_use(path):
        n += 1
        path = Path(f'{name}-{n}')
    return path


# ----- console copy, RNG state, evaluation hooks ---------------------------------------------------

class ConsoleCopy:
    """stdout, copied into a file from `open(path)` on; what was printed before is written there first,
    so a run that fails its checks before its folder exists leaves nothing behind."""

    def __init__(self, stream: TextIO):
        self.stream, self.path, self.file = stream, None, None
        self.pending: Optional[io.StringIO] = io.StringIO()

    def open(self, path: Path) -> None:
        with writing(path):
            self.file = open(path, 'a', buffering=1)
        self.path = path
        self.note(self.pending.getvalue())
        self.pending = None

    def note(self, text: str) -> None:
        """Write `text` to the copy only (not to the screen)."""
        if self.file is None:
            if self.pending is not None:
                self.pending.write(text)
            return
        try:
            self.file.write(text)
        except OSError as e:
            self.close()  # stop copying: the error message itself must still reach the screen
            raise OutputError(self.path, e) from e

    def write(self, text: str) -> int:
        self.stream.write(text)
        self.note(text)
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def close(self) -> None:
        file, self.file, self.pending = self.file, None, None
        if file is not None:
            with contextlib.suppress(OSError):  # a full disk: the error was reported when the line was written
                file.close()


@contextlib.contextmanager
def console_copy(enabled: bool) -> Iterator[Optional[ConsoleCopy]]:
    """Route stdout through a ConsoleCopy while the block runs (None and no copy when not enabled)."""
    if not enabled:
        yield None
        return
    saved = sys.stdout
    sys.stdout = copy = ConsoleCopy(saved)
    try:
        yield copy
    finally:
        sys.stdout = saved
        copy.close()


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


def start_eval_script(script: Path, checkpoint: Path, log_path: Path, wait: bool,
                      print_fn: Callable[[str], None]) -> Optional[subprocess.Popen]:
    """`bash script <abs checkpoint>` with M2D_PYTHON set to this interpreter, output to log_path.

    wait=False runs it in the background; wait=True streams its output to the console and waits.
    A missing script is reported and skipped.
    """
    if not script.is_file():
        print_fn(f'{script.name} not found in {script.parent}: skipping it for {checkpoint.name} '
                 f'(add the script, or point --eval_scripts at its folder)')
        return None
    cmd = ['bash', str(script), str(checkpoint.resolve())]
    env = {**os.environ, 'M2D_PYTHON': sys.executable}
    print_fn(f'Running {" ".join(cmd)} ({"waiting" if wait else "in the background"}; output: {log_path})')
    if not wait:
        with open(log_path, 'ab') as log:
            return subprocess.Popen(cmd, cwd=script.parent, env=env, stdout=log, stderr=subprocess.STDOUT)
    with open(log_path, 'a') as log:
        proc = subprocess.Popen(cmd, cwd=script.parent, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            print_fn(line.rstrip('\n'))
            log.write(line)
        proc.wait()
    print_fn(f'{script.name} finished with exit status {proc.returncode}')
    return proc


# ----- setup ---------------------------------------------------------------------------------------

def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# name -> (test, what the value must be). Applied to the command line and to every value a --resume or
# --init_from checkpoint stores, so a file cannot bring in what a flag could not.
SETTING_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    **{k: (lambda v: v is None or (_is_int(v) and v >= 1), 'a whole number of at least 1')
       for k in ('batch_size', 'epochs', 'accum_iter', 'save_freq', 'print_freq')},
    **{k: (lambda v: v is None or (_is_int(v) and 0 <= v <= MAX_BLOCKS), f'a whole number from 0 to {MAX_BLOCKS}')
       for k in ('depth', 'decoder_depth')},
    **{k: (lambda v: v is None or (_is_int(v) and v >= 0), 'a whole number of 0 or more')
       for k in ('num_workers', 'threads', 'mask_span')},
    **{k: (lambda v: _is_number(v) and v >= 0, 'a finite number of 0 or more')
       for k in ('blr', 'min_lr', 'warmup_epochs', 'weight_decay', 'clip_grad')},
    **{k: (lambda v: _is_number(v) and 0 <= v <= 1, 'a number from 0 to 1') for k in ('ema_decay_init', 'ema_decay')},
    'lr': (lambda v: v is None or (_is_number(v) and v >= 0), 'a finite number of 0 or more'),
    'seed': (_is_int, 'a whole number'),
    'mask_ratio': (lambda v: _is_number(v) and 0 < v < 1, 'between 0 and 1 (exclusive)'),
    'mask_span_share': (lambda v: _is_number(v) and 0 < v <= 1, 'above 0 and at most 1'),
    'noise_ratio': (lambda v: _is_number(v) and 0 <= v < 1, 'from 0 to 1 (exclusive)'),
    'model': (lambda v: v in MODELS, 'one of ' + ', '.join(sorted(MODELS))),
    'loss_fn': (lambda v: v in ('norm_mse', 'mse'), 'norm_mse or mse'),
    'optim': (lambda v: v in ('adamw', 'sgd'), 'adamw or sgd'),
    'norm_pix_loss': (lambda v: isinstance(v, bool), 'true or false'),
    'target_layers': (lambda v: isinstance(v, (list, tuple)) and all(map(_is_int, v)), 'a list of block numbers'),
    **{k: (lambda v: isinstance(v, (list, tuple)) and len(v) == 2 and all(_is_int(x) and x > 0 for x in v),
           'two positive whole numbers') for k in ('input_size', 'patch_size')},
    'norm_stats': (lambda v: v is None or (isinstance(v, (list, tuple)) and len(v) == 2 and all(map(_is_number, v))
                                           and v[1] > 0), 'two finite numbers [mean, std] with std > 0'),
}


def check_settings(values: dict, name: Callable[[str], str] = lambda key: f'--{key}') -> None:
    """Raise UsageError for the first value in `values` (flag name -> value) that is out of its range,
    then for combinations that cannot train. name(key) says where a value came from in the message."""
    for key, (ok, must_be) in SETTING_CHECKS.items():
        if key in values and not ok(values[key]):
            raise UsageError(f'{name(key)} must be {must_be}, got {values[key]!r}')
    if 'input_size' in values and 'patch_size' in values:
        (F, T), (pf, pt) = values['input_size'], values['patch_size']
        if F % pf or T % pt:
            raise UsageError(f'{name("input_size")} {F}x{T} must be a multiple of {name("patch_size")} {pf}x{pt}')
        try:
            check_model_size([F, T], [pf, pt], f'{name("input_size")} {F}x{T} and {name("patch_size")} {pf}x{pt}')
        except CheckpointError as e:
            raise UsageError(str(e)) from None
        span = values.get('mask_span', 0)
        if not span <= T // pt - 1:
            raise UsageError(f'{name("mask_span")} must be 0 (off) to {T // pt - 1} (the time patches of one crop, '
                             f'{T // pt}, less one), got {span}')
    depth = values.get('depth') or 12
    if any(not 0 <= i < depth for i in values.get('target_layers', [])):
        raise UsageError(f'{name("target_layers")} {values["target_layers"]} must index the {depth} encoder blocks')


def validate_args(args: argparse.Namespace) -> None:
    """The command line's values (check_settings) and how they combine."""
    check_settings(vars(args))
    if args.resume and args.init_from:
        raise UsageError('give either --resume (continue a run) or --init_from (start a new run from its weights)')


def resolve_device(name: str, local_rank: int) -> torch.device:
    if name == 'auto':
        name = 'cuda' if torch.cuda.is_available() else 'cpu'
    device = torch.device(name)
    if device.type == 'cuda':
        if not torch.cuda.is_available():
            raise UsageError('--device cuda was requested but CUDA is not available here; '
                             'pass --device cpu to train on the CPU')
        return torch.device('cuda', local_rank)
    return device


def resolve_resources(args: argparse.Namespace, info: distutil.DistInfo, device: torch.device, n_files: int,
                      print_fn: Callable[[str], None]) -> None:
    """Settle the defaults that depend on the data and the machine: batch size, DataLoader workers and
    torch threads (set here for this process)."""
    per_process = n_files // info.world_size
    if args.batch_size is None:
        args.batch_size = min(PUBLISHED_BATCH_SIZE, per_process)
        if 0 < args.batch_size < PUBLISHED_BATCH_SIZE:
            print_fn(f'Note: batch size {args.batch_size} per process, as {n_files} files make no batch of '
                     f'{PUBLISHED_BATCH_SIZE} for {info.world_size} process(es) (--batch_size sets it)')
    if per_process < max(args.batch_size, 1):
        raise UsageError(f'{n_files} files are too few for one batch of {max(args.batch_size, 1)} per process '
                         f'x {info.world_size} processes; lower --batch_size')
    local_processes = int(os.environ.get('LOCAL_WORLD_SIZE', 1))
    if args.num_workers is None:
        # On the CPU, worker processes would take cores from the compute threads.
        args.num_workers = 0 if device.type == 'cpu' else min(PUBLISHED_NUM_WORKERS, usable_cores() // local_processes)
    # Auto: the idle cores on the CPU, unless the user set OMP_NUM_THREADS (torch's default follows it).
    auto_idle = device.type == 'cpu' and 'OMP_NUM_THREADS' not in os.environ
    threads = args.threads or (max(1, idle_cores() // local_processes) if auto_idle else 0)
    if threads:
        torch.set_num_threads(threads)
    print_fn(f'Batch {args.batch_size} per process, {args.num_workers} DataLoader workers, '
             f'{torch.get_num_threads()} torch threads per process{"" if args.threads else " (auto)"}')


def build_model(args: argparse.Namespace) -> MaskedAutoencoderViT:
    kwargs = dict(img_size=args.input_size, patch_size=args.patch_size, decoder_depth=args.decoder_depth,
                  norm_pix_loss=args.norm_pix_loss)
    if args.depth:
        kwargs['depth'] = args.depth
    if is_m2d(args.model):
        kwargs.update(loss_type=getattr(args, 'loss_fn', 'norm_mse'), target_layers=getattr(args, 'target_layers', []))
    model = create_model(args.model, **kwargs)
    if getattr(args, 'mask_span', 0):
        model.set_time_span_mask(args.mask_span, getattr(args, 'mask_span_share', 1.0))
    return model


def save_initial_checkpoint(args: argparse.Namespace, path: Path) -> Path:
    """The weights a one-process run with `args` starts from (seeded with --seed, then built, as the run
    does), with the args, as a checkpoint RuntimeM2D and the evaluator read (a random-init baseline)."""
    seed_everything(args.seed)
    return save_atomic({'model': build_model(args).state_dict(), 'args': args}, path)


def build_optimizer(args: argparse.Namespace, model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """AdamW (0.9, 0.95) or SGD; no weight decay on biases and 1-D parameters (timm's rule)."""
    groups = param_groups_weight_decay(model, args.weight_decay)
    if args.optim == 'sgd':
        return torch.optim.SGD(groups, lr=args.lr, momentum=0.9)
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), fused=device.type == 'cuda')


def prepare_data(args: argparse.Namespace, info: distutil.DistInfo, print_fn: Callable[[str], None]
                 ) -> tuple[list[str], list[float]]:
    """Check that the run folder can be written and the listed files, and settle the normalisation stats,
    on rank 0; then share them (or the error, so that every rank stops with the same message)."""
    payload = None
    if info.is_main:
        try:
            payload = (*_prepare_data(args, print_fn), None)
        except (ValueError, FileNotFoundError) as e:
            payload = (None, None, str(e))
    files, stats, error = distutil.broadcast_object(payload)
    if error:
        raise UsageError(error)
    return files, stats


def _prepare_data(args: argparse.Namespace, print_fn: Callable[[str], None]) -> tuple[list[str], list[float]]:
    # Now, not after a data scan that may take minutes: the folder can be written, and is this run's to write.
    check_writable(args.output_dir, folder=True)
    out = Path(args.output_dir)
    busy = in_use(out)
    if busy:
        raise RunFolderError(busy)
    check_ownership(out, Path(args.resume) if args.resume else None, args.overwrite)
    files = check_files(read_file_list(args.dataset), args.data_path, args.input_size[0], args.skip_missing)
    print_fn(f'Dataset: {len(files)} files from {args.dataset} (data folder {args.data_path})')
    if args.norm_stats is not None:
        print_fn(f'Normalisation stats: mean {args.norm_stats[0]}, std {args.norm_stats[1]}')
        return files, args.norm_stats
    if args.published_data:  # estimated on each process once seeded (_train)
        return files, None
    mean, std, n = compute_norm_stats(files, args.data_path, args.input_size[1], seed=args.seed)
    fewer = ' (every file once: there are fewer files than that)' if n < NORM_STATS_CROPS else ''
    print_fn(f'Normalisation stats from {n} random crops{fewer}: mean {mean:.4f}, std {std:.4f} '
             f'(pass --norm_stats "[{mean:.4f}, {std:.4f}]" to reuse them)')
    return files, [mean, std]


@dataclass
class RunResult:
    output_dir: Path
    model: nn.Module
    last_checkpoint: Optional[Path] = None
    eval_processes: list = field(default_factory=list)


def resume_from(checkpoint: dict, args: argparse.Namespace, info: distutil.DistInfo, model: nn.Module,
                optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, print_fn: Callable[[str], None]) -> int:
    """Restore weights, optimizer, scaler and this rank's RNG from a checkpoint; -> epochs done."""
    try:
        parts = split_state(extract_state_dict(checkpoint, args.resume))
        load_state_strict(model, parts.model, f'--model {args.model} --input_size {args.input_size} '
                                              f'--depth {args.depth} --decoder_depth {args.decoder_depth}')
    except CheckpointError as e:
        raise UsageError(f'--resume {args.resume}: {e}') from None
    if parts.extra:
        print_fn(f'Note: {args.resume} also holds {parts.describe_extra()}; this model does not use them')
    if 'optimizer' not in checkpoint:  # e.g. released weights: continue from them with a fresh optimizer
        print_fn(f'Note: {args.resume} holds weights only; the optimizer starts afresh at epoch {args.start_epoch}')
        return args.start_epoch
    optimizer.load_state_dict(checkpoint['optimizer'])
    if checkpoint.get('scaler'):
        scaler.load_state_dict(checkpoint['scaler'])
    states = checkpoint.get('rng') or []
    if len(states) == info.world_size:
        set_rng_state(states[info.rank])
    else:
        print_fn(f'Note: RNG states not restored (saved by {len(states)} processes, now {info.world_size})')
    epochs_done = int(checkpoint['epoch'])
    print_fn(f'Resumed from {args.resume}: {epochs_done} epochs done')
    return epochs_done


# ----- main ----------------------------------------------------------------------------------------

def main(args: argparse.Namespace, script_dir: Optional[Path] = None) -> RunResult:
    """Pre-train as args say. script_dir: where quick_eval.sh / all_eval.sh live (unless --eval_scripts).

    Raises UsageError for bad arguments or data, NonFiniteLossError if the loss diverges.
    """
    info = distutil.init_distributed(args.device, args.dist_url)
    try:
        return _main(args, info, Path(args.eval_scripts or script_dir or Path.cwd()))
    finally:
        distutil.cleanup()


def _main(args: argparse.Namespace, info: distutil.DistInfo, eval_dir: Path) -> RunResult:
    validate_args(args)
    device = resolve_device(args.device, info.local_rank)
    args.world_size = info.world_size
    print_fn = print if info.is_main else (lambda *_: None)
    checkpoint = None
    if args.resume:
        try:
            checkpoint = load_checkpoint(args.resume, trust=args.trust_checkpoint)
            stored_stats = saved_args(checkpoint).get('norm_stats')
            if args.norm_stats is None and stored_stats is not None:  # the same normalisation as before the stop
                args.norm_stats = list(check_norm_stats(stored_stats, f"{args.resume}'s stored norm_stats"))
        except LOAD_ERRORS as e:
            raise UsageError(f'--resume: {e}') from None
    if not args.output_dir:
        name = Path(args.resume).parent if args.resume else unused_folder(run_name(args))
        args.output_dir = str(distutil.broadcast_object(name))
    out = Path(args.output_dir)
    with console_copy(info.is_main) as console, contextlib.ExitStack() as held:
        try:
            print_fn(f'{datetime.datetime.now():%Y-%m-%d %H:%M:%S} {" ".join(sys.argv)}')
            if checkpoint is not None:
                note_settings_not_resumed(saved_args(checkpoint), args, print_fn)
            files, args.norm_stats = prepare_data(args, info, print_fn)
            resolve_resources(args, info, device, len(files), print_fn)
            # The checks passed: only now the run folder is made (a failed start leaves none), and claimed.
            error = claim_run_folder(out, args, held, console, print_fn) if info.is_main else None
            error = distutil.broadcast_object(error)
            if error:
                raise UsageError(error)
            result = _train(args, info, device, out, files, checkpoint, eval_dir, print_fn)
        except (UsageError, NonFiniteLossError, KeyboardInterrupt) as e:
            if console is not None:
                with contextlib.suppress(OutputError):  # a full disk: the message still reaches the screen
                    console.note(f'{"Interrupted" if isinstance(e, KeyboardInterrupt) else "ERROR"}: {e}\n')
            raise
        print_fn(f'Done; outputs in {out}')
        return result


def claim_run_folder(out: Path, args: argparse.Namespace, held: contextlib.ExitStack, console: ConsoleCopy,
                     print_fn: Callable[[str], None]) -> Optional[str]:
    """Make the run folder and lock it for as long as `held` lasts; move aside what --overwrite replaces;
    start the console copy. -> an error message (to share with the other ranks), or None."""
    try:
        with writing(out):
            out.mkdir(parents=True, exist_ok=True)
        held.enter_context(run_lock(out, print_fn))
        # Checked again under the lock: another run may have saved here since the first look.
        aside = move_aside(out, check_ownership(out, Path(args.resume) if args.resume else None, args.overwrite))
        console.open(out / 'console.txt')
        if aside is not None:
            print_fn(f'--overwrite: moved the earlier files into {aside}')
        remove_stale_temp_files(out)
    except (RunFolderError, OutputError) as e:
        return str(e)
    return None


def note_settings_not_resumed(stored: dict, args: argparse.Namespace, print_fn: Callable[[str], None]) -> None:
    """Say which of the checkpoint's stored paths and run settings a resumed run does not take (see
    RESUMED_ARGS), where they differ from this run's."""
    skipped = [k for k in NOTED_IF_NOT_RESUMED if k in stored and stored[k] != getattr(args, k)]
    if skipped:
        print_fn(f'Note: not taken from {args.resume} (this command line and the defaults decide): '
                 + ', '.join(f'{k}={getattr(args, k)!r} (stored {stored[k]!r})' for k in skipped))


def truncate_log(path: Path, epochs_done: int) -> None:
    """Keep the lines of log.txt up to epoch `epochs_done`, atomically: a run killed after logging epochs
    it never saved must not list them twice once it is resumed from its last checkpoint."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)

    def keep(line: str) -> bool:
        try:
            return json.loads(line)['epoch'] <= epochs_done
        except (ValueError, KeyError, TypeError):  # e.g. a line cut short by the kill
            return False

    kept = [line for line in lines if keep(line)]
    if kept != lines:
        with writing(path), open_atomic(path, 'w') as f:
            f.writelines(kept)


def background_noise(args: argparse.Namespace, files: list[str]) -> Optional[BackgroundNoise]:
    """The --noise_ratio mixer: background crops from --csv_bg_noise, else from the training files."""
    if args.noise_ratio <= 0:
        return None
    if not args.csv_bg_noise:
        return BackgroundNoise(files, args.data_path, args.input_size[1], args.noise_ratio, args.norm_stats[0])
    bg_files = check_files(read_file_list(args.csv_bg_noise), args.data_path, args.input_size[0], args.skip_missing)
    bg_mean = compute_norm_stats(bg_files, args.data_path, args.input_size[1], seed=args.seed)[0]
    return BackgroundNoise(bg_files, args.data_path, args.input_size[1], args.noise_ratio, bg_mean)


def _train(args, info, device, out, files, checkpoint, eval_dir, print_fn) -> RunResult:
    # One seed per rank before the model is built, as published: a seed gives the published initial weights
    # and random streams (DDP hands rank 0's weights to every rank).
    seed_everything(args.seed + info.rank)
    if args.norm_stats is None:  # --published_data: each process estimates its own, from its seeded RNG
        args.norm_stats = list(published_norm_stats(files, args.data_path, args.input_size[1]))
        print_fn(f'Normalisation stats (published estimate, on each process) from {NORM_STATS_CROPS} crops drawn '
                 f'with replacement: mean {args.norm_stats[0]:.4f}, std {args.norm_stats[1]:.4f}')
    raw_model = build_model(args).to(device)

    dataset = SpectrogramDataset(files, args.data_path, args.input_size[1], args.norm_stats,
                                 background_noise(args, files))
    # A seeded per-epoch shuffle (set_epoch) for one process too: the order depends only on seed and epoch.
    # --published_data: sampler seed 0, a padded last batch, and (on one process) the epoch-1 order throughout.
    sampler = DistributedSampler(dataset, num_replicas=info.world_size, rank=info.rank, shuffle=True,
                                 seed=0 if args.published_data else args.seed, drop_last=not args.published_data)
    reshuffle = info.distributed or not args.published_data
    # Workers start afresh each epoch (not persistent), seeded from the main RNG: a resume stays exact.
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, num_workers=args.num_workers,
                        pin_memory=args.pin_mem and device.type == 'cuda', drop_last=True)

    eff_batch = args.batch_size * args.accum_iter * info.world_size
    args.eff_batch_size = eff_batch
    if args.lr is None:
        args.lr = scaled_lr(args.blr, eff_batch)
    print_fn(f'Effective batch {eff_batch} = {args.batch_size} per process x {args.accum_iter} accumulation '
             f'x {info.world_size} processes; lr {args.lr:.3e} (blr {args.blr:.3e} x {eff_batch} / 256), '
             f'warm-up {args.warmup_epochs:g} of {args.epochs} epochs')
    if args.warmup_epochs >= args.epochs:
        print_fn(f'Note: the lr warm-up ({args.warmup_epochs:g} epochs) spans the whole run ({args.epochs} epochs): '
                 'the lr only rises and never decays; pass a smaller --warmup_epochs')

    precision = Precision.from_flag(args.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision.use_scaler)
    optimizer = build_optimizer(args, raw_model, device)
    start_epoch = args.start_epoch
    if args.init_from:
        load_initial_weights(raw_model, args.init_from, args.trust_checkpoint, print_fn)
    if checkpoint is not None:
        start_epoch = resume_from(checkpoint, args, info, raw_model, optimizer, scaler, print_fn)
    if info.is_main:  # lines of epochs after the start (a killed run's, or a fresh start's leftovers) go
        truncate_log(out / 'log.txt', start_epoch)

    model = raw_model
    if info.distributed:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == 'cuda' else None)
    if args.compile:
        model = torch.compile(model)
    print_fn(f'Model {args.model}: {sum(p.numel() for p in raw_model.parameters() if p.requires_grad) / 1e6:.2f}M '
             f'trainable parameters; precision {precision.dtype or torch.float32}; device {device}')
    print_fn(f'Arguments: {json.dumps(vars(args), default=str)}')

    schedule = Schedule(args.lr, args.min_lr, args.warmup_epochs, args.epochs, len(loader),
                        getattr(args, 'ema_decay_init', 0.0), getattr(args, 'ema_decay', 0.0))
    log_dir = Path(args.log_dir or out)
    with writing(log_dir):
        # purge_step: TensorBoard drops the points a killed run logged after its last checkpoint, so each
        # step shows once however often the run was stopped and resumed.
        writer = SummaryWriter(str(log_dir), purge_step=start_epoch * len(loader)) if info.is_main else None
    vis_names, vis_lms = load_vis_samples(Path(args.data_path) / 'vis_samples', args.input_size[1], args.norm_stats)
    result = RunResult(out, raw_model)
    last_epoch = args.epochs if args.stop_at <= 0 else min(args.stop_at, args.epochs)
    clock = RunClock(start_epoch * len(loader), last_epoch * len(loader))
    epoch = start_epoch
    try:
        for epoch in range(start_epoch, last_epoch):
            if reshuffle:
                sampler.set_epoch(epoch)
            try:
                stats = train_one_epoch(model, raw_model, loader, optimizer, scaler, precision, schedule, epoch,
                                        device, args.mask_ratio, args.accum_iter, args.clip_grad, args.print_freq,
                                        info.world_size, writer, print_fn, clock)
            except OSError as e:  # TensorBoard's writer thread; a full or read-only disk is never a data read
                if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
                    raise OutputError(log_dir, e) from e
                raise
            done = epoch + 1
            if info.is_main:
                with writing(out / 'log.txt'), open(out / 'log.txt', 'a') as f:
                    f.write(json.dumps({'epoch': done, **{f'train_{k}': v for k, v in stats.items()}}) + '\n')
                with writing(log_dir):
                    writer.flush()
            if done % args.save_freq == 0 or done == last_epoch:
                rng_states = distutil.all_gather_objects(rng_state())
                if info.is_main:
                    path = out / f'checkpoint-{done}.pth'
                    with writing(path):
                        save_checkpoint(path, raw_model, optimizer, scaler, done, args, rng_states)
                    result.last_checkpoint = path
                    print_fn(f'Saved {path}')
                    with writing(out / 'loss.png'):
                        save_loss_curve(out / 'log.txt', out / 'loss.png')
                    if vis_lms is not None:
                        with writing(out / f'vis-{done}.png'):
                            save_mask_figure(raw_model, vis_lms, vis_names, args.mask_ratio, out / f'vis-{done}.png',
                                             seed=args.seed)
                    if done >= args.eval_after:
                        proc = start_eval_script(eval_dir / 'quick_eval.sh', path, out / f'quick_eval-{done}.log',
                                                 False, print_fn)
                        result.eval_processes += [proc] if proc else []
                distutil.barrier()
    except KeyboardInterrupt:
        raise Interrupted(resume_hint(epoch + 1, result.last_checkpoint or (args.resume or None))) from None
    finally:
        if writer is not None:
            with contextlib.suppress(OSError):  # flushed after every epoch; a failure was reported there
                writer.close()
    if info.is_main and result.last_checkpoint is not None:
        start_eval_script(eval_dir / 'all_eval.sh', result.last_checkpoint, out / 'all_eval.log', True, print_fn)
    return result


def resume_hint(epoch: int, last_checkpoint: Optional[Union[str, Path]]) -> str:
    """What to do after a Ctrl-C in `epoch` (1-based)."""
    if last_checkpoint is None:
        return f'in epoch {epoch}, before the first checkpoint; run the same command again to start over'
    return f'in epoch {epoch}; the last checkpoint is {last_checkpoint}: run the same command with ' \
           f'--resume {last_checkpoint} to continue from it'


def run(args: argparse.Namespace, script_dir: Optional[Path] = None) -> int:
    """`m2d train`: train as args say; -> 0, or 1 when the loss diverged. Usage and data errors raise
    UsageError and Ctrl-C raises Interrupted, for m2d.cli.guarded to report."""
    try:
        main(args, script_dir or REPO)
    except NonFiniteLossError as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    return 0


def cli(mae: bool = False, script_dir: Optional[Path] = None, argv: Optional[list[str]] = None) -> int:
    """Entry point of train_audio.py / mae_train_audio.py: parse, train, and turn known failures into
    a message and an exit status (2: bad arguments or data, 1: non-finite loss, 130: interrupted)."""
    return guarded(lambda: run(parse_args(argv, mae), script_dir))
