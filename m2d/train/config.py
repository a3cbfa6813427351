"""Pre-training settings: the flags of train_audio.py (`m2d train`) and mae_train_audio.py, the presets,
and their resolution into one read-only TrainConfig.

Resolution happens once, in this order: the command line; --preset's recipe for the flags not given;
--init_from's model and sizes; --resume's stored model and optimisation settings (RESUMED_ARGS; never its
paths, programs, devices or workers). Every value, from a flag or a file, passes check_settings. The run
then settles what depends on the data and the machine (m2d.train.setup.settle) into a new TrainConfig, which
the loop reads and checkpoints store as their `args` (an argparse.Namespace, as published).
"""
import argparse
import math
from typing import Any, Callable, Optional

from m2d.checkpoint import (
    MAX_BLOCKS,
    backbone_model,
    check_model_size,
    describe,
    extract_state_dict,
    load_checkpoint,
    parse_size,
    saved_args,
    split_state,
)
from m2d.cli.common import ArgumentParser, add_device_argument, add_norm_stats_argument, parse_norm_stats, parse_numbers
from m2d.errors import CheckpointError, M2DError, UsageError
from m2d.model.vit import MODELS, MaskedAutoencoderViT, create_model
from m2d.train.engine import AMP_DTYPES

# Recipes for --preset: values for the flags a command line does not give. 'small' was chosen by the sweeps
# of bench/bench_learning.py (docs/pretraining.md; bench/RESULTS.md): on 1,000 clips, a longer EMA horizon
# helps, and 40 ms patches (16x4, as the later p16x4 weights) on 0.64 s crops learn more than 160 ms
# patches (16x16) on 1.1 or 2.1 s crops, most on speech, at about twice the CPU time of the 1.1 s ones.
# Those sweeps clipped the gradient norm at 3.0 (then the default), which the recipe keeps: its lr is
# 30 times the published base lr.
PRESETS = {
    'small': dict(model='m2d_vit_tiny', depth=4, decoder_depth=2, input_size=[80, 64], patch_size=[16, 4],
                  batch_size=16, epochs=60, warmup_epochs=5, blr=1e-2, ema_decay_init=0.999, ema_decay=0.9999,
                  mask_ratio=0.5, clip_grad=3.0),
}

PUBLISHED_BATCH_SIZE = 512

PUBLISHED_NUM_WORKERS = 10

PUBLISHED_WARMUP_SHARE = 20 / 300  # --warmup_epochs 20 of --epochs 300


class TrainConfig(argparse.Namespace):
    """The settings of one run (attribute per flag), read-only: replace() makes a changed copy.
    Checkpoints store to_namespace(), a plain argparse.Namespace, as the published ones do."""

    def __init__(self, **settings: Any):
        for key, value in settings.items():
            object.__setattr__(self, key, value)

    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError(f'TrainConfig is read-only; make a changed copy with replace({key}=...)')

    __delattr__ = __setattr__

    def replace(self, **changes: Any) -> 'TrainConfig':
        return TrainConfig(**{**vars(self), **changes})

    def to_namespace(self) -> argparse.Namespace:
        return argparse.Namespace(**vars(self))


def size_arg(text: str) -> list[int]:
    """argparse type: '80x208' -> [80, 208]; '16' -> [16, 16]."""
    try:
        return parse_size(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected a size like 80x208, got {text!r}') from None

def get_args_parser(mae: bool = False) -> argparse.ArgumentParser:
    """The train_audio.py flags (published names and defaults); mae=True: mae_train_audio.py (MSM-MAE)."""
    p = ArgumentParser('mae_train_audio.py' if mae else 'train_audio.py', description=__doc__)
    add_arguments(p, mae)
    return p

def add_arguments(p: argparse.ArgumentParser, mae: bool = False) -> None:
    """Add the pre-training options to `p` (M2D's defaults; mae=True: MSM-MAE's)."""
    p.add_argument('--batch_size', default=None, type=int,
                   help='batch size per process (GPU); default 512, or fewer when the dataset has fewer files')
    p.add_argument('--epochs', default=300, type=int, help='length of the run (the lr and EMA schedules span it)')
    p.add_argument('--accum_iter', default=1, type=int, help='gradient accumulation steps per update')
    p.add_argument('--eval_after', default=100, type=int,
                   help='evaluate checkpoints from this epoch on (quick_eval.sh, or the built-in quick suite)')
    p.add_argument('--save_freq', default=100, type=int, help='save a checkpoint every N epochs (and at the end)')
    p.add_argument('--save_every_steps', default=0, type=int,
                   help='also save checkpoint-last.pth every N steps within an epoch, which --resume continues from '
                        'at that step (0 = off); exact on --shards (docs/data-at-scale.md)')
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
        p.add_argument('--norm_pix_loss', action='store_true',
                       help='per-patch normalised pixels as targets (without it: raw pixels)')
    else:
        p.add_argument('--no_norm_pix_loss', action='store_false', dest='norm_pix_loss',
                       help='do not standardise the target representations (without it they are, as published)')
        p.add_argument('--ema_decay_init', default=0.99995, type=float, help='EMA decay of the target at the start')
        p.add_argument('--ema_decay', default=0.99999, type=float, help='EMA decay at the end (linear in between)')
        p.add_argument('--loss_fn', default='norm_mse', choices=['norm_mse', 'mse'],
                       help='norm_mse: MSE of L2-normalised vectors; mse: plain MSE')
        p.add_argument('--target_layers', default=[], type=lambda s: parse_numbers(s, int),
                       help="average these target blocks' outputs, e.g. '[8,9,10,11]' (default: the last block)")
    p.add_argument('--compile', action='store_true', help='torch.compile the model, block by block (m2d/train/fast.py)')
    p.add_argument('--fast', action='store_true',
                   help='the fastest settings that keep the published numerics (docs/gpu-training.md): bf16 autocast '
                        '(unless --amp is given), and on CUDA torch.compile')
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
    p.add_argument('--shards', default='', type=str,
                   help='train from the shard set of m2d pack at this folder or URL instead of --dataset '
                        '(docs/data-at-scale.md) (default: none, the --dataset files)')
    p.add_argument('--shard_cache', default='', type=str,
                   help='folder for shards fetched from a URL and the marks of checked shards (default: '
                        '~/.cache/m2d/shards)')
    p.add_argument('--shard_cache_gb', default=0.0, type=float,
                   help='keep at most this many GB of fetched shards in --shard_cache, the least recently used '
                        'going first (0 = no limit)')
    add_norm_stats_argument(p, help='mean and std of the LMS (default: measured on 10,000 random crops at start)')
    p.add_argument('--skip_missing', action='store_true',
                   help='drop missing, corrupt or NaN/inf-holding files instead of failing (without it: fail, '
                        'naming them)')
    p.add_argument('--noise_ratio', default=0.0, type=float,
                   help='mix each crop with a random background crop at this power share (0 = off; the later '
                        "M2D's background-noise mixing, a regulariser for small data)")
    p.add_argument('--csv_bg_noise', default='', type=str,
                   help='file list of the background crops, relative to --data_path (default: the --dataset files)')
    p.add_argument('--num_workers', default=None, type=int,
                   help='DataLoader worker processes per training process (default: on CUDA 10, the published '
                        'value, or the cores each process has if fewer; on the CPU 0, loading in the training process)')
    p.add_argument('--pin_mem', action='store_true', help='pin CPU memory in the DataLoader (on by default)')
    p.add_argument('--no_pin_mem', action='store_false', dest='pin_mem',
                   help='do not pin CPU memory (without it: pinned)')
    p.set_defaults(pin_mem=True)
    # Run.
    p.add_argument('--output_dir', default='', type=str, help='run folder (default: named after the settings)')
    p.add_argument('--log_dir', default='', type=str, help='TensorBoard folder (default: the run folder)')
    add_device_argument(p)
    p.add_argument('--threads', default=0, type=int,
                   help='torch threads per process; 0: torch\'s own number when OMP_NUM_THREADS is set or on '
                        'CUDA, else the cores that other processes leave idle (default: 0)')
    p.add_argument('--seed', default=0, type=int, help='seed of the weights, data order, crops and masks')
    p.add_argument('--published_data', action='store_true',
                   help="the published code's data quirks, for comparison with its runs: on one process the "
                        'epoch-1 order every epoch, sampler seed 0 whatever --seed, the last batch padded, and '
                        'without --norm_stats the statistics of 10,000 crops drawn with replacement on each process '
                        '(docs/differences.md)')
    p.add_argument('--resume', default='', type=str,
                   help='checkpoint to continue from, in its own run folder; what it stores of the model and the '
                        'optimisation fills the flags not given (' + ', '.join(RESUMED_ARGS) + '); everything else '
                        '(paths, data, devices, workers, evaluation) comes from the command line and the defaults '
                        '(default: none, a new run)')
    p.add_argument('--overwrite', action='store_true',
                   help='start a new run in a folder that holds checkpoints of an earlier one (or resume from an '
                        'earlier checkpoint than its latest): its files are moved into previous-<date>-<time>/ '
                        '(without it: such a folder is refused)')
    p.add_argument('--trust_checkpoint', action='store_true',
                   help='let --resume and --init_from unpickle anything in the file (it could run code): only for '
                        'files you trust (without it: tensors and containers only)')
    p.add_argument('--start_epoch', default=0, type=int, help='first epoch (set from the checkpoint on --resume)')
    p.add_argument('--init_from', default='', type=str,
                   help='start a new run from the weights of this checkpoint (further pre-training, e.g. released '
                        "weights on your own data): its model and sizes fill the flags not given, the optimizer "
                        'and schedules start afresh (default: none, random initial weights)')
    p.add_argument('--preset', default='', choices=['', *PRESETS], metavar='{' + ','.join(PRESETS) + '}',
                   help='a recipe filling the flags not given: small = the small-data recipe of docs/pretraining.md '
                        "(bench/bench_learning.py) (default: none, every flag's own default)")
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
                'published_data', 'save_every_steps')

# Stored settings a user might expect a resume to carry on; a note names those that differ.
NOTED_IF_NOT_RESUMED = ('data_path', 'dataset', 'shards', 'csv_bg_noise', 'skip_missing', 'log_dir', 'eval_scripts',
                        'eval_after', 'device', 'compile', 'fast')

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
        except M2DError as e:
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
    except M2DError as e:
        raise UsageError(f'--init_from: {e}') from None
    stats = spec.norm_stats or saved_args(checkpoint).get('norm_stats')
    return dict(model=backbone_model(spec.model), input_size=spec.input_size, patch_size=spec.patch_size,
                depth=spec.depth, decoder_depth=spec.decoder_depth or None, norm_stats=stats)

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
       for k in ('num_workers', 'threads', 'mask_span', 'save_every_steps')},
    **{k: (lambda v: _is_number(v) and v >= 0, 'a finite number of 0 or more')
       for k in ('blr', 'min_lr', 'warmup_epochs', 'weight_decay', 'clip_grad', 'shard_cache_gb')},
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
    if getattr(args, 'shards', '') and (args.published_data or args.noise_ratio > 0):
        raise UsageError('--shards works without --published_data and --noise_ratio (both read --dataset files)')

def is_m2d(model_name: str) -> bool:
    return model_name.startswith('m2d')

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
