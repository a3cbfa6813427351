"""The main job on built-in demo data, end to end on CPU in a few minutes (no downloads):

1. generate an unlabelled demo corpus of synthetic sound events (m2d.audio.synth.write_corpus),
2. convert it to log-mel spectrograms with `m2d wav2lms` and list it in a CSV,
3. pre-train a small M2D with `m2d train --preset small` (the small-data recipe),
4. encode audio with RuntimeM2D from the resulting checkpoint,
5. linear-evaluate it on a labelled demo task (the evaluation `m2d train` runs at the end), next to
   the weights that pre-training started from (its random initialisation).

Each step runs the command a user would type (printed before it runs). Everything goes below --out: the
evaluator is pointed there by M2D_EVAL_DEMO (the demo task), M2D_EVAL_RESULTS (scores) and M2D_EVAL_CACHE.
Usage: m2d demo [--out demo_run] [--epochs 60] [--n_files 800]   (also: python -m m2d demo)
"""
import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

from m2d.audio.io import load_audio
from m2d.audio.synth import write_corpus
from m2d.checkpoint import model_tag
from m2d.cli.common import run_tool
from m2d.eval.embeddings import CACHE_ENV
from m2d.eval.results import RESULTS_ENV, short_weight, summary_table
from m2d.eval.tasks import DEMO_DIR_ENV
from m2d.runtime.runtime import RuntimeM2D
from m2d.train.config import PRESETS, parse_args
from m2d.train.main import save_initial_checkpoint


def run_step(cmd: list[str], env: dict[str, str]) -> None:
    """Print a command as a user would type it, run it, stop on failure."""
    print(f'\n$ {shlex.join(cmd)}', flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, **env})


def m2d(*args: str) -> list[str]:
    """`m2d ARGS...`, run with this interpreter (python -m m2d)."""
    return [sys.executable, '-m', 'm2d', *args]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--out', default='demo_run',
                        help='folder for everything the demo writes')
    parser.add_argument('--n_files', type=int, default=800, help='clips in the unlabelled corpus')
    for flag, kind, what in (('epochs', int, 'pre-training epochs'), ('batch_size', int, 'pre-training batch size'),
                             ('depth', int, 'encoder blocks (published: 12)'),
                             ('decoder_depth', int, 'decoder blocks (published: 8)'),
                             ('blr', float, 'base learning rate (lr = blr * batch / 256)')):
        parser.add_argument(f'--{flag}', type=kind, default=None, help=f"{what} (default: --preset small's, "
                                                                       f"{PRESETS['small'][flag]})")


def main(argv=None) -> int:
    return run_tool(sys.modules[__name__], 'm2d demo', argv)


def run(args: argparse.Namespace) -> int:
    """`m2d demo`: the five steps; a failed step stops the demo with its exit status."""
    try:
        demo(args)
    except subprocess.CalledProcessError as e:
        print(f'error: the step above failed with exit status {e.returncode}', file=sys.stderr)
        return e.returncode
    return 0


def demo(args: argparse.Namespace) -> None:
    out = Path(args.out).resolve()
    results = out / 'results' / 'scores.csv'
    env = {DEMO_DIR_ENV: str(out / 'demo_task'), RESULTS_ENV: str(results), CACHE_ENV: str(out / 'eval_cache')}
    print('Evaluation outputs go below --out: ' + ' '.join(f'{k}={v}' for k, v in env.items()))
    started = time.time()

    print(f'[1/5] Generating {args.n_files} demo clips (random events, lengths, sample rates, channels)')
    write_corpus(out / 'audio', args.n_files, seed=0)

    print('\n[2/5] Converting the corpus to log-mel spectrograms')
    data = out / 'data'
    run_step(m2d('wav2lms', str(out / 'audio'), str(data / 'lms'), '--csv', str(data / 'files_demo.csv'),
                 '--data_path', str(data)), env)
    vis = data / 'vis_samples'
    vis.mkdir(exist_ok=True)
    for path in sorted((data / 'lms').rglob('*.npy'))[:2]:
        (vis / path.name).write_bytes(path.read_bytes())

    print('\n[3/5] Pre-training a small M2D on CPU (--preset small, the small-data recipe)')
    overrides = [f'--{k}={v}' for k in ('epochs', 'batch_size', 'depth', 'decoder_depth', 'blr')
                 if (v := getattr(args, k)) is not None]
    flags = ['--preset', 'small', *overrides, '--device', 'cpu', '--data_path', str(data),
             '--dataset', str(data / 'files_demo.csv')]
    train = parse_args(flags)  # the recipe's values, for the folder name and the baseline below
    run_dir = out / 'runs' / f'{model_tag(train)}-demo'
    flags += ['--output_dir', str(run_dir), '--save_freq', str(train.epochs), '--eval_after', str(train.epochs + 1)]
    run_step(m2d('train', *flags), env)
    checkpoint = run_dir / f'checkpoint-{train.epochs}.pth'

    print('\n[4/5] Encoding audio with RuntimeM2D from the checkpoint')
    runtime = RuntimeM2D(weight_file=str(checkpoint))
    wav = sorted((out / 'audio').rglob('*.wav'))[0]
    audio = torch.from_numpy(load_audio(wav))[None]
    frames = runtime.encode(audio)
    print(f'RuntimeM2D(weight_file={str(checkpoint)!r})')
    print(f'  .encode({wav.name}: {list(audio.shape)} samples) -> frame features {list(frames.shape)}; '
          f'clip embedding {list(frames.mean(dim=1).shape)}')

    print('\n[5/5] Linear evaluation on the demo task: the pre-trained checkpoint was evaluated at the end of '
          'training above; now the weights pre-training started from')
    baseline = save_initial_checkpoint(train, out / 'runs' / f'{model_tag(train)}-random_init' / 'checkpoint-0.pth')
    run_step(m2d('eval', 'lineareval', str(baseline), 'demo'), env)
    scores = summary_table(results, weights=[str(checkpoint), str(baseline)])['demo']
    trained, untrained = scores[short_weight(str(checkpoint))], scores[short_weight(str(baseline))]
    print(f'\nDemo finished in {(time.time() - started) / 60:.1f} min. Outputs:')
    print(f'  corpus {out / "audio"}, LMS {data / "lms"}, file list {data / "files_demo.csv"}')
    print(f'  pre-training run {run_dir} '
          '(checkpoint, log.txt, console.txt, TensorBoard, loss curve, mask pictures)')
    print(f'  demo task {out / "demo_task"}, scores {results}')
    print(f'Linear-evaluation accuracy on the demo task (8 classes, chance 12.5%; {train.model}, '
          f'{train.depth} blocks):')
    print(f'  pre-trained M2D : {trained:.1f}%')
    print(f'  random weights  : {untrained:.1f}%')


if __name__ == '__main__':
    sys.exit(main())
