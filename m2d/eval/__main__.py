"""python -m m2d.eval {lineareval,finetune,summary,suite,make_demo} ...   (also: m2d eval ...)

    m2d eval lineareval WEIGHT_FILE demo                 # the built-in demo task
    m2d eval lineareval WEIGHT_FILE cremad --evar_root /path/to/evar     # or M2D_EVAL_DATA=/path/to/evar
    m2d eval lineareval WEIGHT_FILE my/meta.csv --data_path my/wavs --clip_seconds 5
    m2d eval finetune WEIGHT_FILE esc50 --lr 0.5 --freq_mask 0 --time_mask 0 --training_mask 0.5 --mixup 0.0 \\
        --rrc True
    m2d eval suite WEIGHT_FILE --config quick
    m2d eval summary [results/scores.csv]

Every evaluation appends a row to results/scores.csv in the folder the command runs in (--results or
$M2D_EVAL_RESULTS change it); docs/command-line.md describes the options shared with the other commands.
"""
import argparse
import sys

from m2d.cli.common import (
    add_device_argument,
    add_model_arguments,
    add_norm_stats_argument,
    add_normalisation_arguments,
    run_tool,
)
from m2d.errors import M2DError, UsageError
from m2d.eval.embeddings import POOLINGS
from m2d.eval.finetune import FinetuneConfig, finetune
from m2d.eval.linear_probe import ProbeConfig
from m2d.eval.lineareval import linear_evaluation
from m2d.eval.results import DEFAULT_RESULTS, RESULTS_ENV, write_summary
from m2d.eval.suite import SUITES, run_suite
from m2d.eval.tasks import DATA_ROOT_ENV, DEMO_DIR


def str2bool(value: str) -> bool:
    if value.lower() in ('true', '1', 'yes', 'on'):
        return True
    if value.lower() in ('false', '0', 'no', 'off'):
        return False
    raise argparse.ArgumentTypeError(f'expected True or False, got {value!r}')


def add_common(p: argparse.ArgumentParser, batch_size: int, suite: bool = False) -> None:
    """Options shared by lineareval, finetune and suite: weight, data location, model settings."""
    p.add_argument('weight_file', metavar='WEIGHT_FILE',
                   help="checkpoint path, or 'random' (with --model and --input_size)")
    if not suite:
        p.add_argument('task', metavar='TASK',
                       help='demo, an EVAR task name (esc50, us8k, spcv2, vc1, voxforge, cremad, gtzan, nsynth, surge, '
                            '...) or a metadata CSV path')
        p.add_argument('--data_path', '--audio_root', dest='data_path',
                       help="the folder the task's file names start from (default: an EVAR task's work/16k/TASK; "
                            "a CSV task's folder/audio, or the CSV's folder)")
        p.add_argument('--clip_seconds', '--duration', dest='clip_seconds', type=float,
                       help="seconds per clip, cropped or zero-padded (default: an EVAR task's, as EVAR; a CSV "
                            "task's longest file)")
    p.add_argument('--evar_root', '--data_root', dest='evar_root',
                   help=f'an EVAR checkout (or a folder in its layout) holding evar/metadata/TASK.csv and '
                        f'work/16k/TASK/, where EVAR task names are found (default: ${DATA_ROOT_ENV})')
    p.add_argument('--results', default=str(DEFAULT_RESULTS),
                   help=f'results CSV to append a row to (default: ${RESULTS_ENV}, else results/scores.csv in the '
                        'folder the command runs in)')
    p.add_argument('--batch_size', type=int, default=batch_size, help='clips per batch')
    p.add_argument('--seed', type=int, default=0, help='seed of the probe or fine-tuning (and the fold split)')
    p.add_argument('--num_workers', type=int, default=0, help='audio-loading worker processes (0: load in this one)')
    add_device_argument(p)
    add_model_arguments(p)
    p.add_argument('--cls_token', action='store_true', help='prepend the [CLS] output to every frame feature')


def runtime_settings(args) -> dict:
    out = dict(model=args.model, input_size=args.input_size, patch_size=args.patch_size)
    for flag in ('cls_token', 'trust_checkpoint'):
        if getattr(args, flag):
            out[flag] = True
    if args.norm_stats:
        out['norm_stats'] = args.norm_stats
    return out


def add_probe(p: argparse.ArgumentParser) -> None:
    d = ProbeConfig()
    p.add_argument('--output_layers', type=int, nargs='+', default=[-1],
                   help='blocks whose features are concatenated (-1: final output); e.g. --output_layers -1 -2')
    add_normalisation_arguments(p, data="the task's training clips (all clips of a fold task)", alone='each batch')
    p.add_argument('--pooling', choices=POOLINGS, default='mean',
                   help="clip embedding: time mean of the frame features (as published), or 'mean+std' "
                        '(time mean and std side by side, twice the dimensions)')
    p.add_argument('--lr', type=float, default=d.lr, help='linear probe learning rate (Adam)')
    p.add_argument('--epochs', type=int, default=d.epochs, help='linear probe epochs at most')
    p.add_argument('--patience', type=int, default=d.patience, help='early stopping patience (epochs on valid)')
    p.add_argument('--cache_dir', help='embedding cache (default: $M2D_EVAL_CACHE, else work/eval_cache in the '
                                       'folder the command runs in; "" disables it)')


def probe_kwargs(args) -> dict:
    return dict(output_layers=args.output_layers, dataset_norm=args.dataset_norm, pooling=args.pooling,
                batch_size=args.batch_size,
                seed=args.seed, results=args.results, num_workers=args.num_workers, device=args.device,
                cache_dir=args.cache_dir, probe=ProbeConfig(lr=args.lr, epochs=args.epochs, patience=args.patience,
                                                            seed=args.seed),
                **runtime_settings(args))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest='command', metavar='COMMAND', required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help)

    p = command('lineareval', 'linear evaluation of a checkpoint on one task')
    add_common(p, batch_size=64)
    add_probe(p)

    p = command('finetune', 'fine-tune a checkpoint on one task')
    d = FinetuneConfig()
    add_common(p, batch_size=d.batch_size)
    add_norm_stats_argument(p, help="normalise with these fixed statistics (also: --norm_stats MEAN STD) (default: "
                                    "those the weights store, else the mean and std of the task's training clips, "
                                    'as the published fine-tuning)')
    p.add_argument('--lr', type=float, default=d.lr, help='peak learning rate')
    p.add_argument('--optim', choices=['sgd', 'adamw'], default=d.optim, help='SGD with momentum, or AdamW')
    p.add_argument('--epochs', type=int, default=d.epochs, help='training epochs')
    p.add_argument('--warmup_epochs', type=int, default=d.warmup_epochs, help='linear warm-up, then cosine decay')
    p.add_argument('--early_stop', type=int, default=d.early_stop, help='patience in epochs; -1: never stop early')
    p.add_argument('--mixup', type=float, default=d.mixup, help='mixup alpha (0: off)')
    p.add_argument('--freq_mask', type=int, default=d.freq_mask, help='frequency mask width at most (bins)')
    p.add_argument('--time_mask', type=int, default=d.time_mask, help='time mask width at most (frames)')
    p.add_argument('--rrc', type=str2bool, default=d.rrc, help='random resized crop: True/False')
    p.add_argument('--training_mask', type=float, default=d.training_mask,
                   help='ratio of tokens masked (whole rows/columns) while training')
    p.add_argument('--fold', type=int, default=1, help='held-out fold of a fold task')

    p = command('suite', 'linear evaluation on a suite of tasks, then the summary')
    add_common(p, batch_size=64, suite=True)
    add_probe(p)
    p.add_argument('--config', choices=list(SUITES), default='quick',
                   help=', '.join(f'{k}: {" ".join(v)}' for k, v in SUITES.items()))
    p.add_argument('--tasks', nargs='*', help="tasks to run instead of the config's (default: the config's)")

    p = command('summary', 'weights x tasks table of the results CSV (also saved as CSV and markdown)')
    p.add_argument('results', nargs='?', default=str(DEFAULT_RESULTS), metavar='RESULTS',
                   help=f'results CSV (default: ${RESULTS_ENV}, else %(default)s in the folder the command runs in)')
    p.add_argument('--mode', choices=['lineareval', 'finetune'], default='lineareval', help='which rows to show')

    p = command('make_demo', '(re)generate the labelled demo task')
    p.add_argument('--dst', default=str(DEMO_DIR), help='folder to write it to')
    p.add_argument('--seed', type=int, default=0, help='seed of the generated sounds')


def check_numbers(args: argparse.Namespace) -> None:
    """Counts and lengths out of range are one-line errors (argparse would add its usage text)."""
    for name, least in (('batch_size', 1), ('epochs', 1), ('fold', 1), ('num_workers', 0)):
        value = getattr(args, name, None)
        if value is not None and value < least:
            raise UsageError(f'{args.command}: --{name} must be {"at least 1" if least else "0 or more"}, got {value}')
    if getattr(args, 'clip_seconds', None) is not None and not args.clip_seconds > 0:
        raise UsageError(f'{args.command}: --clip_seconds must be above 0 seconds, got {args.clip_seconds}')


def run(args: argparse.Namespace) -> int:
    """`m2d eval` / python -m m2d.eval: problems with the options, task, data or weights are one-line errors."""
    check_numbers(args)
    try:
        if args.command == 'lineareval':
            row = linear_evaluation(args.weight_file, args.task, evar_root=args.evar_root, data_path=args.data_path,
                                    clip_seconds=args.clip_seconds, **probe_kwargs(args))
            print(f'{row["task"]}: {row["metric"]} {100 * row["score"]:.2f}% (valid {100 * row["valid"]:.2f}%, '
                  f'{row["n_clips"]} clips, {row["classes"]} classes, {row["seconds"]} s'
                  f'{", cached embeddings" if row["cached"] else ""}) -> {args.results}')
        elif args.command == 'finetune':
            cfg = FinetuneConfig(**{k: getattr(args, k) for k in FinetuneConfig.__dataclass_fields__})
            row = finetune(args.weight_file, args.task, cfg, evar_root=args.evar_root, data_path=args.data_path,
                           clip_seconds=args.clip_seconds, fold=args.fold, results=args.results,
                           num_workers=args.num_workers, device=args.device, **runtime_settings(args))
            print(f'{row["task"]}: fine-tuned {row["metric"]} {100 * row["score"]:.2f}% (best valid '
                  f'{100 * row["valid"]:.2f}%, {row["epochs_run"]} epochs, {row["seconds"]} s) -> {args.results}')
        elif args.command == 'suite':
            run_suite(args.weight_file, args.config, args.tasks, evar_root=args.evar_root, **probe_kwargs(args))
        elif args.command == 'summary':
            print(write_summary(args.results, mode=args.mode))
        elif args.command == 'make_demo':
            from m2d.audio.synth import write_labelled_task
            print(write_labelled_task(args.dst, seed=args.seed))
    except M2DError as e:
        raise UsageError(f'{args.command}: {e}') from None
    return 0


def main(argv=None) -> int:
    return run_tool(sys.modules[__name__], 'python -m m2d.eval', argv)


if __name__ == '__main__':
    sys.exit(main())
