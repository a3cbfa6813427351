"""Benchmark: m2d.tools.wav_to_lms.convert_folder vs a naive per-file process pool (the published approach).

    python -m bench.bench_wav_to_lms --n_files 200 --baseline_threads 1

Writes a demo corpus (m2d.audio.synth.write_corpus: random sample rates, lengths and channel counts) to a
temporary folder, converts it with both, checks that the outputs agree, and prints files/s,
audio-seconds/s and the speedup. The baseline: multiprocessing Pool() (spawn, one process per core)
mapping one task per file; each task receives the mel front end pickled with its arguments, loads
with librosa.load(sr=16000, mono=True), runs nnAudio's MelSpectrogram with torch's default thread
count, and np.save()s the result. --baseline_threads N adds a run of it with torch limited to N threads.
"""
import argparse
import multiprocessing as mp
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from m2d.audio.synth import write_corpus
from m2d.tools.wav_to_lms import convert_folder
from util.cpu import usable_cores


def _baseline_task(args: tuple) -> None:
    """One file: librosa load, nnAudio MelSpectrogram, log(mel + eps), np.save (no atomic write)."""
    import librosa
    src, dst, melspec, threads = args
    if threads:
        torch.set_num_threads(threads)
    wav, _ = librosa.load(src, sr=16000, mono=True)
    with torch.no_grad():
        lms = (melspec(torch.tensor(wav)) + torch.finfo(torch.float32).eps).log()
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    np.save(dst, lms.numpy())


def run_baseline(src: Path, dst: Path, threads: int = 0) -> None:
    import nnAudio.features
    melspec = nnAudio.features.MelSpectrogram(sr=16000, n_fft=400, win_length=400, hop_length=160, n_mels=80,
                                              fmin=50, fmax=8000, center=True, power=2, verbose=False)
    files = sorted(src.rglob('*.wav'))
    tasks = [(str(f), str(dst / f.relative_to(src).with_suffix('.npy')), melspec, threads) for f in files]
    with mp.get_context('spawn').Pool() as pool:
        for _ in pool.imap(_baseline_task, tasks):
            pass


def compare(a: Path, b: Path) -> tuple[int, int, float]:
    """(files, bitwise-equal files, max abs difference) over the .npy files below a, matched in b."""
    files = sorted(a.rglob('*.npy'))
    equal, worst = 0, 0.0
    for f in files:
        x, y = np.load(f), np.load(b / f.relative_to(a))
        if x.shape != y.shape or x.dtype != y.dtype:
            raise SystemExit(f'output mismatch for {f.relative_to(a)}: {x.shape} {x.dtype} vs {y.shape} {y.dtype}')
        equal += int(np.array_equal(x, y))
        worst = max(worst, float(np.abs(x - y).max()))
    return len(files), equal, worst


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--n_files', type=int, default=200)
    p.add_argument('--min_seconds', type=float, default=1.0)
    p.add_argument('--max_seconds', type=float, default=10.0)
    p.add_argument('--workers', type=int, default=None, help='ours: processes (default: all cores)')
    p.add_argument('--baseline_threads', type=int, default=0, help='also run the baseline with N torch threads')
    p.add_argument('--seed', type=int, default=0)
    args = p.parse_args()

    with tempfile.TemporaryDirectory(prefix='bench_wav_to_lms_') as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        files = write_corpus(tmp / 'wav', args.n_files, seed=args.seed, seconds=(args.min_seconds, args.max_seconds))
        audio_s = sum(sf.info(f).duration for f in files)
        print(f'corpus: {len(files)} files, {audio_s:.0f} s of audio ({time.perf_counter() - t0:.1f} s to write); '
              f'{usable_cores()} cores, torch {torch.__version__}')

        runs = [('ours (convert_folder)', lambda d: convert_folder(tmp / 'wav', d, workers=args.workers,
                                                                    progress=False))]
        runs.append(('baseline (per-file pool, default threads)', lambda d: run_baseline(tmp / 'wav', d)))
        if args.baseline_threads:
            runs.append((f'baseline (per-file pool, {args.baseline_threads} thread(s))',
                         lambda d: run_baseline(tmp / 'wav', d, args.baseline_threads)))
        times = []
        for i, (name, run) in enumerate(runs):
            t0 = time.perf_counter()
            run(tmp / f'out{i}')
            times.append(time.perf_counter() - t0)
            speedup = f'  ours is x{times[-1] / times[0]:.2f} faster' if i else ''
            print(f'{name:45s} {times[-1]:7.2f} s  {len(files) / times[-1]:7.1f} files/s  '
                  f'{audio_s / times[-1]:8.0f} audio-s/s{speedup}')
        for i in range(1, len(runs)):
            n, equal, worst = compare(tmp / 'out0', tmp / f'out{i}')
            print(f'ours vs {runs[i][0]}: {n} files, {equal} bitwise equal, max abs diff {worst:.3g}')
            if n != len(files) or worst > 1e-4:
                raise SystemExit('outputs differ')


if __name__ == '__main__':
    main()
