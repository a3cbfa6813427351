"""Does pre-training learn? Pre-train M2D on a small realistic corpus, then linear-probe held-out tasks
and compare with the same architecture at its random initialisation and with a log-mel baseline.

    python -m bench.bench_learning                                    # the small-data recipe, 1,000 clips
    python -m bench.bench_learning --name mr6 -- --mask_ratio 0.6     # anything after -- goes to train_audio.py
    python -m bench.bench_learning --name further --corpus_kinds sentence,word -- --init_from RUN/checkpoint-60.pth

The corpus (bench/learning_corpus.py: speech from espeak-ng in six languages, General-MIDI instruments
rendered by fluidsynth, environmental textures, all over background noise at random SNRs) and three
probe tasks (digits, language, instrument) are built once under --work. They need the system packages
espeak-ng, fluidsynth and fluid-soundfont-gm (Debian/Ubuntu: `apt-get install espeak-ng fluidsynth
fluid-soundfont-gm`); without them the benchmark says so and exits with status 0 (skipped).

Pre-training is the real `train_audio.py`, in a subprocess on the CPU (its CPU time is measured).
The random-initialisation baseline is the model that run would start from without --init_from (same
flags and seed); with --init_from, the weights it starts from are probed too ('start'). Probes:
clip embeddings of the final layer's frame features (LMS normalised with the task's training
statistics), pooled two ways, and the log-mel baseline (the LMS's own 80 mel bins as frame features)
pooled the same way in each: the time mean (as published; EVAR, HEAR; log-mel 80-d) and the time mean
and std (statistics pooling; log-mel 160-d, the classic per-bin mean/std baseline). Scores of the
second pooling go to scores.csv as 'WEIGHTS, mean+std'. Each probe is the built-in linear probe
(m2d.eval) trained on the train split with early stopping on valid, averaged over --probe_seeds.
Prints a table per pooling and appends its scores to <work>/scores.csv (one row per run, task and
weights).
"""
import argparse
import csv
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

# The evaluator's progress bars would drown the table; tqdm reads this when it is first imported (by torch).
os.environ.setdefault('TQDM_DISABLE', '1')

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench import learning_corpus  # noqa: E402
from m2d.audio.io import load_audio  # noqa: E402
from m2d.audio.lms import LogMelSpectrogram  # noqa: E402
from m2d.checkpoint import run_name  # noqa: E402
from m2d.eval.embeddings import POOLINGS, fix_length, pool, task_embeddings  # noqa: E402
from m2d.eval.linear_probe import ProbeConfig  # noqa: E402
from m2d.eval.lineareval import probe_task  # noqa: E402
from m2d.eval.tasks import TaskData, load_task, resolve_task  # noqa: E402
from m2d.tools.wav_to_lms import convert_folder, write_file_list  # noqa: E402
from m2d.train.config import parse_args  # noqa: E402
from m2d.train.main import save_initial_checkpoint  # noqa: E402

# The recipe under test (train_audio.py flags); arguments after -- are appended and win.
RECIPE = ['--preset', 'small']


def prepare_data(work: Path, n_files: int, seed: int, kinds: list[str],
                 task_clips: Optional[int] = None) -> tuple[Path, Path, dict[str, Path]]:
    """Corpus -> LMS files (once) and the CSV of the `kinds` of clips to pre-train on (all when empty).
    -> (data folder, CSV, {task: metadata.csv})."""
    corpus, tasks = learning_corpus.build(work, n_files, seed, task_clips)
    data, built_from, converted = work / 'data', (work / 'DONE').read_text(), work / 'data' / 'DONE'
    if not (converted.is_file() and converted.read_text() == built_from):
        shutil.rmtree(data, ignore_errors=True)  # LMS of an earlier corpus
        report = convert_folder(corpus, data / 'lms', progress=False)
        if report.failed:
            raise SystemExit(f'error: {len(report.failed)} corpus files failed to convert:\n{report.summary()}')
        write_file_list(data / 'lms', data / 'files.csv', data_path=data)
        converted.write_text(built_from)
    if not kinds:
        return data, data / 'files.csv', tasks
    csv_path = data / f'files-{"-".join(kinds)}.csv'
    write_file_list([data / 'lms' / kind for kind in kinds], csv_path, data_path=data)
    return data, csv_path, tasks


def train_args(args: argparse.Namespace, data: Path, csv_path: Path, out: Path) -> list[str]:
    return ['--device', 'cpu', '--num_workers', '0', '--data_path', str(data), '--dataset', str(csv_path),
            '--seed', str(args.seed), '--output_dir', str(out), '--eval_scripts', str(out / 'no_eval'),
            '--print_freq', '1000', '--threads', str(args.threads), *RECIPE, *args.train]


def pretrain(flags: list[str], threads: int, log_path: Path) -> tuple[float, float]:
    """Run `m2d train` with `flags` on `threads` threads; -> (CPU minutes, wall minutes)."""
    env = {**os.environ, 'OMP_NUM_THREADS': str(threads), 'MKL_NUM_THREADS': str(threads)}
    log_path.parent.mkdir(parents=True, exist_ok=True)
    before, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.time()
    with open(log_path, 'w') as log:
        proc = subprocess.run([sys.executable, '-m', 'm2d', 'train', *flags], env=env, stdout=log,
                              stderr=subprocess.STDOUT)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        raise SystemExit(f'error: m2d train failed (exit {proc.returncode}); see {log_path}')
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return cpu / 60, (time.time() - t0) / 60


def logmel_embeddings(task: TaskData) -> np.ndarray:
    """Each clip's LMS bins pooled over time with 'mean+std': [N, 160] (per-bin mean, then std)."""
    to_lms = LogMelSpectrogram()
    samples = int(round(task.spec.seconds * 16000))
    out = []
    with torch.inference_mode():
        for path in task.files:
            lms = to_lms(fix_length(torch.from_numpy(load_audio(path)), samples)[None])  # [1, 80, T]
            out.append(pool(lms.transpose(1, 2), 'mean+std')[0].numpy())
    return np.stack(out)


def split_pooled(mean_std: np.ndarray) -> dict[str, np.ndarray]:
    """'mean+std' embeddings [N, 2D] -> {pooling: embeddings}; the first half is the time mean [N, D]."""
    return {'mean': np.ascontiguousarray(mean_std[:, :mean_std.shape[1] // 2]), 'mean+std': mean_std}


def probe(embeddings: np.ndarray, task: TaskData, seeds: int) -> float:
    """Mean test score (%) of the linear probe over `seeds` probe seeds."""
    return 100 * float(np.mean([probe_task(embeddings, task, ProbeConfig(seed=s))['score'] for s in range(seeds)]))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    train_extra = argv[argv.index('--') + 1:] if '--' in argv else []
    argv = argv[:argv.index('--')] if '--' in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--work', default=str(Path('work') / 'bench_learning'), help='corpus, runs and results')
    p.add_argument('--name', default='recipe', help='run name (folder below <work>/runs and results row)')
    p.add_argument('--n_files', type=int, default=1000, help='clips in the pre-training corpus')
    p.add_argument('--task_clips', type=int, default=None,
                   help='clips per class in each probe task (default: 60 digits, 80 language, 60 instrument)')
    p.add_argument('--seed', type=int, default=0, help='corpus and training seed')
    p.add_argument('--threads', type=int, default=1, help='torch threads for training and probing')
    p.add_argument('--probe_seeds', type=int, default=3, help='linear probes per embedding set (averaged)')
    p.add_argument('--corpus_kinds', default='', help='pre-train on these kinds of corpus clips only, e.g. '
                   'sentence,word (speech); default: all (sentence, word, music, texture)')
    p.add_argument('--reuse', action='store_true', help='probe an existing run of this name instead of training')
    args = p.parse_args(argv)
    args.train = train_extra
    missing = learning_corpus.missing_tools()
    if missing:
        print('bench_learning: skipped, this machine lacks ' + '; '.join(missing))
        return 0
    torch.set_num_threads(args.threads)
    work = Path(args.work).resolve()
    data, csv_path, task_csvs = prepare_data(work, args.n_files, args.seed,
                                             [k for k in args.corpus_kinds.split(',') if k], args.task_clips)

    run_dir = work / 'runs' / args.name
    flags = train_args(args, data, csv_path, run_dir / 'trained')
    train = parse_args(flags)
    name = run_name(train)
    flags[flags.index('--output_dir') + 1] = str(run_dir / 'trained' / name)  # a folder RuntimeM2D can parse
    checkpoints = sorted((run_dir / 'trained' / name).glob('checkpoint-*.pth'), key=lambda p: int(p.stem.split('-')[1]))
    cpu_min = wall_min = float('nan')
    if not (args.reuse and checkpoints):
        print(f'Pre-training {args.name}: train_audio.py {" ".join(flags)}', flush=True)
        cpu_min, wall_min = pretrain(flags, args.threads, run_dir / 'train.log')
        checkpoints = sorted((run_dir / 'trained' / name).glob('checkpoint-*.pth'),
                             key=lambda p: int(p.stem.split('-')[1]))
    trained = checkpoints[-1]
    # The weights train_audio.py starts from with these flags, before any --init_from.
    weights = {'random init': save_initial_checkpoint(train, run_dir / 'init' / name / 'checkpoint-0.pth')}
    if train.init_from:
        weights['start'] = Path(train.init_from)
    weights['pre-trained'] = trained
    log = [json.loads(line) for line in (trained.parent / 'log.txt').read_text().splitlines()]

    # scores[pooling][task][weights]: the encoders and the log-mel baseline pooled as published (time
    # mean), then as statistics (time mean and std), so that pooling is not what a comparison measures.
    scores = {pooling: {} for pooling in POOLINGS}
    for task_name, metadata in task_csvs.items():
        task = load_task(resolve_task(str(metadata), clip_seconds=learning_corpus.TASKS[task_name][2]))
        embeddings = {'log-mel': logmel_embeddings(task)}
        for label, weight in weights.items():
            embeddings[label] = task_embeddings(weight, task, cache_dir='', device='cpu', pooling='mean+std')[0]
        for label, mean_std in embeddings.items():
            for pooling, pooled in split_pooled(mean_std).items():
                scores[pooling].setdefault(task_name, {})[label] = probe(pooled, task, args.probe_seeds)
        for pooling in POOLINGS:
            row = scores[pooling][task_name]
            print(f'  {task_name}, {pooling}: ' + ', '.join(f'{k} {v:.1f}' for k, v in row.items()), flush=True)

    columns = ('log-mel', *weights)
    titles = {'mean': 'time mean (final layer; log-mel bins), as published',
              'mean+std': 'time mean and std (final layer; log-mel bins), statistics pooling'}
    for pooling in POOLINGS:
        print(f'\nLinear-probe test accuracy (%), mean of {args.probe_seeds} probe seeds; run {args.name!r}; '
              f'embeddings: {titles[pooling]}')
        print(f'{"task":<12}' + ''.join(f'{c:>14}' for c in columns))
        for task_name, row in scores[pooling].items():
            print(f'{task_name:<12}' + ''.join(f'{row[c]:>14.1f}' for c in columns))
        means = {c: float(np.mean([row[c] for row in scores[pooling].values()])) for c in columns}
        print(f'{"mean":<12}' + ''.join(f'{means[c]:>14.1f}' for c in columns))
    print(f'Pre-training: {cpu_min:.1f} CPU-min ({wall_min:.1f} min wall, {args.threads} thread(s)); '
          f'final loss {log[-1]["train_loss"]:.4f} after {log[-1]["epoch"]} epochs; {trained}')
    print(f'Flags: {" ".join(RECIPE + args.train)}')

    results = work / 'scores.csv'
    new = not results.is_file()
    with open(results, 'a', newline='') as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(['name', 'flags', 'cpu_min', 'wall_min', 'final_loss', 'task', 'weights', 'score'])
        for pooling in POOLINGS:
            for task_name, row in scores[pooling].items():
                for label, score in row.items():
                    if pooling != 'mean':
                        label = f'{label}, {pooling}'
                    writer.writerow([args.name, ' '.join(args.train), f'{cpu_min:.2f}', f'{wall_min:.2f}',
                                     f'{log[-1]["train_loss"]:.4f}', task_name, label, f'{score:.2f}'])
    return 0


if __name__ == '__main__':
    sys.exit(main())
