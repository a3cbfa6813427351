"""python -m m2d.eval {lineareval,finetune,summary,suite,make_demo} ...   (also: m2d eval ...)

    python -m m2d.eval lineareval CHECKPOINT demo             # the built-in demo task
    python -m m2d.eval lineareval CHECKPOINT cremad           # EVAR data below $M2D_EVAL_DATA
    python -m m2d.eval lineareval CHECKPOINT my/meta.csv --audio_root my/wavs --duration 5
    python -m m2d.eval finetune CHECKPOINT esc50 --lr 0.5 --freq_mask 0 --time_mask 0 --training_mask 0.5 --mixup 0.0 --rrc True
    python -m m2d.eval suite CHECKPOINT --config quick
    python -m m2d.eval summary [results/scores.csv]
"""
import argparse
import sys

from m2d.cli.common import HelpFormatter, add_norm_stats_argument, run_tool
from m2d.errors import M2DError, UsageError
from m2d.eval.embeddings import POOLINGS
from m2d.eval.finetune import FinetuneConfig, finetune
from m2d.eval.linear_probe import ProbeConfig
from m2d.eval.lineareval import linear_evaluation
from m2d.eval.results import DEFAULT_RESULTS, write_summary
from m2d.eval.suite import SUITES, run_suite
from m2d.eval.tasks import DEMO_DIR


def str2bool(value: str) -> bool:
    if value.lower() in ('true', '1', 'yes', 'on'):
        return True
    if value.lower() in ('false', '0', 'no', 'off'):
        return False
    raise argparse.ArgumentTypeError(f'expected True or False, got {value!r}')


def add_common(p: argparse.ArgumentParser, suite: bool = False) -> None:
    """Options shared by lineareval, finetune and suite: weight, data location, model settings."""
    p.add_argument('weight', help="checkpoint path, or 'random' (with --model and --input_size)")
    if not suite:
        p.add_argument('task', help='demo, an EVAR task name (esc50, us8k, spcv2, vc1, voxforge, cremad, gtzan, '
                                    'nsynth, surge, ...) or a metadata CSV path')
        p.add_argument('--audio_root', help='audio folder of a CSV task (default: CSV folder/audio, or the folder)')
        p.add_argument('--duration', type=float, help='seconds per clip (crop/pad); default: the task\'s')
    p.add_argument('--data_root', help='EVAR data root holding evar/metadata/ and work/16k/ (default $M2D_EVAL_DATA)')
    p.add_argument('--results', default=str(DEFAULT_RESULTS), help='results CSV to append to')
    p.add_argument('--batch_size', type=int, help='clips per batch')
    p.add_argument('--seed', type=int, default=0, help='seed of the probe or fine-tuning (and the fold split)')
    p.add_argument('--num_workers', type=int, default=0, help='audio-loading worker processes')
    p.add_argument('--device', help='cuda or cpu (default: cuda when available)')
    p.add_argument('--model', default='', help='model name when the folder name does not tell it (e.g. m2d_vit_base)')
    p.add_argument('--input_size', help='FxT, e.g. 80x608, when the folder name does not tell it')
    p.add_argument('--patch_size', help='pfxpt, e.g. 16x16')
    p.add_argument('--cls_token', action='store_true', help='prepend the [CLS] output to every frame feature')
    add_norm_stats_argument(p, help='normalise every LMS with these fixed statistics, as EVAR\'s M2D wrapper with '
                                    'mean/std set (default: training-set stats, or those the weights store)')
    p.add_argument('--trust_checkpoint', action='store_true',
                   help='unpickle anything in the weight file (it could run code): only for files you trust')


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
    p.add_argument('--dataset_norm', action='store_true', default=True,
                   help='normalise LMS with training-set stats as EVAR does (the default)')
    p.add_argument('--no_dataset_norm', '--no-dataset_norm', action='store_false', dest='dataset_norm',
                   help='normalise each batch with its own stats instead, like RuntimeM2D.encode')
    p.add_argument('--pooling', choices=POOLINGS, default='mean',
                   help="clip embedding: time mean of the frame features (as published), or 'mean+std' "
                        '(time mean and std side by side, twice the dimensions)')
    p.add_argument('--lr', type=float, default=d.lr, help='linear probe learning rate (Adam)')
    p.add_argument('--epochs', type=int, default=d.epochs, help='linear probe epochs at most')
    p.add_argument('--patience', type=int, default=d.patience, help='early stopping patience (epochs on valid)')
    p.add_argument('--cache_dir', help='embedding cache (default $M2D_EVAL_CACHE or work/eval_cache; "" disables)')


def probe_kwargs(args) -> dict:
    return dict(output_layers=args.output_layers, dataset_norm=args.dataset_norm, pooling=args.pooling,
                batch_size=args.batch_size or 64,
                seed=args.seed, results=args.results, num_workers=args.num_workers, device=args.device,
                cache_dir=args.cache_dir, probe=ProbeConfig(lr=args.lr, epochs=args.epochs, patience=args.patience,
                                                            seed=args.seed),
                **runtime_settings(args))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest='command', required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help, formatter_class=HelpFormatter)

    p = command('lineareval', 'linear evaluation of a checkpoint on one task')
    add_common(p)
    add_probe(p)

    p = command('finetune', 'fine-tune a checkpoint on one task')
    add_common(p)
    d = FinetuneConfig()
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
    add_common(p, suite=True)
    add_probe(p)
    p.add_argument('--config', choices=list(SUITES), default='quick',
                   help=', '.join(f'{k}: {" ".join(v)}' for k, v in SUITES.items()))
    p.add_argument('--tasks', nargs='*', help='tasks to run instead of the config\'s')

    p = command('summary', 'weights x tasks table of the results CSV (also saved as CSV and markdown)')
    p.add_argument('results', nargs='?', default=str(DEFAULT_RESULTS), help='results CSV (default: %(default)s)')
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
    if getattr(args, 'duration', None) is not None and not args.duration > 0:
        raise UsageError(f'{args.command}: --duration must be above 0 seconds, got {args.duration}')


def run(args: argparse.Namespace) -> int:
    """`m2d eval` / python -m m2d.eval: problems with the options, task, data or weights are one-line errors."""
    check_numbers(args)
    try:
        if args.command == 'lineareval':
            row = linear_evaluation(args.weight, args.task, data_root=args.data_root, audio_root=args.audio_root,
                                    seconds=args.duration, **probe_kwargs(args))
            print(f'{row["task"]}: {row["metric"]} {100 * row["score"]:.2f}% (valid {100 * row["valid"]:.2f}%, '
                  f'{row["n_clips"]} clips, {row["classes"]} classes, {row["seconds"]} s'
                  f'{", cached embeddings" if row["cached"] else ""}) -> {args.results}')
        elif args.command == 'finetune':
            given = {k: getattr(args, k) for k in FinetuneConfig.__dataclass_fields__}
            cfg = FinetuneConfig(**{k: v for k, v in given.items() if v is not None})  # no --batch_size: the default
            row = finetune(args.weight, args.task, cfg, data_root=args.data_root, audio_root=args.audio_root,
                           seconds=args.duration, fold=args.fold, results=args.results, num_workers=args.num_workers,
                           device=args.device, **runtime_settings(args))
            print(f'{row["task"]}: fine-tuned {row["metric"]} {100 * row["score"]:.2f}% (best valid '
                  f'{100 * row["valid"]:.2f}%, {row["epochs_run"]} epochs, {row["seconds"]} s) -> {args.results}')
        elif args.command == 'suite':
            run_suite(args.weight, args.config, args.tasks, data_root=args.data_root, **probe_kwargs(args))
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
