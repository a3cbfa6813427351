"""Loss curves of --fast against the published path on the same data and seed, with a second seed of the
published path as the noise band, in one PNG.

    python -m bench.loss_curves --out OUT [--fast_run RUN] TRAIN_FLAGS...

TRAIN_FLAGS go to every run of train_audio.py (data, model, batch, epochs, ...). The published path is
train_audio.py's defaults, the published recipe's numerics (fp16 autocast with a dynamic loss scaler on
CUDA; fp32 on the CPU), run with --seed for each of --seeds; the fast run adds --fast with the first seed,
unless --fast_run names a finished run folder of it (e.g. a torchrun run that was stopped and resumed).
Evaluation is switched off in the runs made here. Each run's loss at every step comes from its
TensorBoard events (a step logged again after a resume counts once, the last time).

Writes OUT/loss_curves.png, OUT/loss_curves.json and OUT/runs/ (run folders, replaced on every call, and
their console logs). The
verdict compares the curves smoothed over --smooth steps, on the second half of the steps: the mean
absolute gap between --fast and the published path at the same seed, against the gap between the
published path's first two seeds (seed noise). --fast is within seed noise when its gap is no larger.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import matplotlib
import numpy as np

matplotlib.use('Agg')  # files only
import matplotlib.pyplot as plt  # noqa: E402

from bench.mfu import fail  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def step_losses(run_dir: Path) -> np.ndarray:
    """train_loss of every step of a run folder, in step order (the last value logged for a step)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run_dir), size_guidance={'scalars': 0})
    events.Reload()
    by_step = {e.step: e.value for e in events.Scalars('train_loss')}
    return np.array([by_step[s] for s in sorted(by_step)], dtype=np.float64)


def smooth(x: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average (shorter at the start)."""
    c = np.cumsum(np.insert(x, 0, 0.0))
    i = np.arange(1, len(x) + 1)
    return (c[i] - c[np.maximum(i - window, 0)]) / np.minimum(i, window)


def gap(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute difference over the second half of the common steps."""
    n = min(len(a), len(b))
    return float(np.abs(a[n // 2:n] - b[n // 2:n]).mean())


def train(name: str, flags: list[str], out: Path) -> Path:
    """Run train_audio.py with `flags` into OUT/runs/NAME (its console in OUT/runs/NAME.log) -> the run folder."""
    run_dir, log = out / 'runs' / name, out / 'runs' / f'{name}.log'
    shutil.rmtree(run_dir, ignore_errors=True)  # this script's own folder: a run from an earlier call goes
    no_scripts = out / 'runs' / 'no_eval_scripts'  # an empty folder: the runs skip their evaluations
    no_scripts.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(REPO / 'train_audio.py'), *flags, '--output_dir', str(run_dir),
           '--eval_scripts', str(no_scripts)]
    start = time.perf_counter()
    with open(log, 'w') as f:
        f.write(' '.join(cmd) + '\n')
        f.flush()
        status = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, 'PYTHONUNBUFFERED': '1'},
                                cwd=out).returncode
    print(f'  {name}: exit status {status} in {time.perf_counter() - start:.0f} s (console: {log})', flush=True)
    if status:
        fail(f'the {name} run failed (exit status {status}); see {log}')
    return run_dir


def plot(curves: dict[str, np.ndarray], smoothed: dict[str, np.ndarray], window: int, title: str, path: Path) -> None:
    """Raw losses faint, smoothed ones (over `window` steps) solid; the published seeds' smoothed range shaded."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    published = [v for k, v in smoothed.items() if k.startswith('published')]
    n = min(len(c) for c in published)
    steps = np.arange(1, n + 1)
    ax.fill_between(steps, np.min([c[:n] for c in published], axis=0), np.max([c[:n] for c in published], axis=0),
                    color='tab:blue', alpha=0.15, label='published path: range over seeds')
    colours = {'published': 'tab:blue', 'fast': 'tab:orange'}
    for name, loss in curves.items():
        colour = colours[name.split('-')[0]]
        style = '-' if name.endswith('seed0') or name.startswith('fast') else '--'
        x = np.arange(1, len(loss) + 1)
        ax.plot(x, loss, color=colour, alpha=0.15, linewidth=0.8)
        ax.plot(x, smoothed[name], color=colour, linestyle=style, linewidth=1.6, label=f'{name} (smoothed)')
    ax.set_xlabel('step')
    ax.set_ylabel(f'training loss (smoothed over {window} steps)')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: Optional[list[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--out', required=True, help='folder for the PNG, the JSON and the runs')
    p.add_argument('--seeds', nargs='+', type=int, default=[0, 1], help='seeds of the published path (2 or more)')
    p.add_argument('--fast_run', default=None, help='a finished --fast run folder to take its curve from')
    p.add_argument('--smooth', type=int, default=20, help='moving-average window in steps')
    args, train_flags = p.parse_known_args(argv)
    if len(args.seeds) < 2:
        p.error('--seeds needs two or more seeds (the second gives the noise band)')
    if '--seed' in train_flags or '--fast' in train_flags:
        p.error('give the seeds with --seeds; --fast is added to the fast run')
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    print(f'Loss curves: published path, seeds {args.seeds}; --fast, seed {args.seeds[0]}', flush=True)
    runs = {f'published-seed{s}': train(f'published-seed{s}', [*train_flags, '--seed', str(s)], out)
            for s in args.seeds}
    fast = Path(args.fast_run) if args.fast_run else train(
        f'fast-seed{args.seeds[0]}', [*train_flags, '--fast', '--seed', str(args.seeds[0])], out)
    runs[f'fast-seed{args.seeds[0]}'] = fast
    curves = {name: step_losses(folder) for name, folder in runs.items()}
    smoothed = {name: smooth(loss, args.smooth) for name, loss in curves.items()}
    names = list(curves)
    noise = gap(smoothed[names[0]], smoothed[names[1]])
    fast_gap = gap(smoothed[names[-1]], smoothed[names[0]])
    result = dict(
        steps={k: len(v) for k, v in curves.items()},
        final_loss={k: float(v[-args.smooth:].mean()) for k, v in curves.items()},
        seed_noise=noise, fast_gap=fast_gap, within_seed_noise=bool(fast_gap <= noise), smooth=args.smooth,
        runs={k: str(v) for k, v in runs.items()}, train_flags=train_flags,
        curves={k: v.tolist() for k, v in curves.items()})
    verdict = 'within' if result['within_seed_noise'] else 'OUTSIDE'
    title = (f'--fast vs the published path: gap {fast_gap:.4f} vs seed noise {noise:.4f}: {verdict} seed noise\n'
             f'(mean |difference| of the smoothed curves over the second half of the steps)')
    plot(curves, smoothed, args.smooth, title, out / 'loss_curves.png')
    (out / 'loss_curves.json').write_text(json.dumps(result, indent=1))
    print(f'{title.replace(chr(10), " ")}\nfinal losses (mean of the last {args.smooth} steps): '
          + ', '.join(f'{k} {v:.4f}' for k, v in result['final_loss'].items())
          + f'\nwrote {out / "loss_curves.png"} and {out / "loss_curves.json"}', flush=True)
    return result


if __name__ == '__main__':
    main()
