"""Benchmark: pre-training data, the published path (CSV + one .npy per clip) against shards (m2d pack).

    python -m bench.bench_data --clips 10000 100000 --frames 100 --crop 64     # scaling with the corpus
    python -m bench.bench_data --clips 10000 --frames 1001 --crop 608          # AudioSet-length clips
    python -m bench.bench_data --fp16 --frames 1001 --crop 608                 # what float16 storage changes

For each corpus size: writes that many random LMS clips (1, 80, frames) as .npy files and a CSV, packs
them (--dtype), then measures, each in a fresh process:
- start-up: the data part of launch -> first step (list, checks, norm stats, loader, first batch), at a
  first start and at a repeated start (what is remembered: the checked files, the checked shards);
- loader throughput of one process (one core): samples/s of batches of random crops, with the files
  in the page cache (warm) and after evicting them (posix_fadvise DONTNEED on every file: cold), and the
  process's peak RSS; the best of --repeats runs (on a shared machine, other jobs only slow a run down).
Then: loader cores one GPU needs on each path (its samples/s over one loader process's samples/s, a
process per core: waiting for the disk counts), from M2D ViT-B's FLOPs per sample (counted) at an assumed
share of a GPU's peak. Corpora go to --workdir
and are deleted afterwards.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

GPUS = ('H100', 'A100')  # their dense bf16 peaks: bench/mfu.py's PEAK_BF16_TFLOPS
MFU = 0.4  # the share of the peak a well-fed ViT-B step reaches (an assumption, stated in the output)
BATCH = 64


def make_corpus(root: Path, clips: int, frames: int) -> None:
    (root / 'lms').mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    names = []
    for i in range(clips):
        name = f'lms/{i // 1000:04d}/{i:07d}.npy'
        (root / name).parent.mkdir(exist_ok=True)
        np.save(root / name, (rng.standard_normal((1, 80, frames), np.float32) * 2 - 5))
        names.append(name)
    (root / 'files.csv').write_text('file_name\n' + '\n'.join(names) + '\n')


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, not inherited from the parent)."""
    status = Path('/proc/self/status').read_text()
    return int(status.split('VmHWM:')[1].split()[0]) / 1024


def evict(folder: Path) -> None:
    """Drop every file below `folder` from the page cache (written back first: dirty pages stay cached)."""
    os.sync()
    for path in folder.rglob('*'):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)


def config(root: Path, path: str, crop: int, norm_stats=(-5.0, 2.0)):
    return argparse.Namespace(data_path=str(root), dataset=str(root / 'files.csv'), input_size=[80, crop],
                              norm_stats=norm_stats, noise_ratio=0.0, csv_bg_noise='',
                              published_data=False, seed=0, batch_size=BATCH, num_workers=0, pin_mem=False,
                              shards=str(root / 'shards') if path == 'shards' else '',
                              shard_cache=str(root / 'cache'), skip_missing=False)


def child_startup(root: Path, path: str, crop: int) -> dict:
    """Launch -> first batch, the data part, as a run does it (m2d.train.setup.load_data, then the loader)."""
    import torch

    from m2d.train.data import make_loader
    from m2d.train.setup import load_data
    from util.dist import DistInfo
    start = time.perf_counter()
    data, stats = load_data(config(root, path, crop, norm_stats=None), print_fn=lambda _: None)
    loader, start_of_epoch = make_loader(config(root, path, crop, stats), DistInfo(), data, torch.device('cpu'))
    start_of_epoch(0)
    next(iter(loader))
    return {'seconds': time.perf_counter() - start}


def child_loader(root: Path, path: str, crop: int, samples: int) -> dict:
    """One process (num_workers 0) loading `samples` random crops: samples/s and peak RSS."""
    import torch

    from m2d.train.data import make_loader, read_file_list
    from m2d.train.shard_set import open_shards
    from util.dist import DistInfo
    torch.set_num_threads(1)
    baseline = peak_rss_mb()  # the interpreter, torch, m2d
    data = open_shards(str(root / 'shards'), 80) if path == 'shards' else read_file_list(root / 'files.csv')
    loader, start_of_epoch = make_loader(config(root, path, crop), DistInfo(), data, torch.device('cpu'))
    start_of_epoch(0)
    batches, samples = iter(loader), min(samples, len(loader) * BATCH)
    wall, cpu, n = time.perf_counter(), time.process_time(), 0
    while n < samples:
        n += len(next(batches))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {'samples_per_s': n / wall, 'samples_per_cpu_s': n / cpu,
            'peak_rss_mb': peak_rss_mb(), 'baseline_rss_mb': baseline}


def in_child(*args: str) -> dict:
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    done = subprocess.run([sys.executable, '-m', 'bench.bench_data', '--child', *args], capture_output=True,
                          text=True, env=env, check=True)
    return json.loads(done.stdout.splitlines()[-1])


def step_flops(crop: int) -> float:
    """FLOPs of one M2D ViT-B training step per sample (forward and backward, 16x16 patches, mask 0.7),
    counted as bench/bench_train.py counts them (attention included)."""
    import torch

    from bench.bench_train import flops_per_sample
    from bench.mfu import Shape
    from m2d.model.vit import create_model
    shape = Shape((80, crop), (16, 16))
    return flops_per_sample(lambda: create_model('m2d_vit_base', img_size=list(shape.input_size), patch_size=[16, 16]),
                            shape, torch.device('cpu'), 0.7)


def fp16_deviation(frames: int, crop: int) -> None:
    """float16 storage against float32: the stored values (log-mel units) and the loss of one ViT-B step."""
    import torch

    from m2d.model.vit import create_model
    rng = np.random.default_rng(0)
    # Log-mel values in the range of real ones: AudioSet LMS have mean about -7 and std about 4.
    x = (rng.standard_normal((8, 1, 80, frames)) * 4.2 - 7.1).astype(np.float32)
    error = np.abs(x.astype(np.float16).astype(np.float32) - x)
    print(f'float16 storage: |error| max {error.max():.4f}, mean {error.mean():.5f} log-mel units '
          f'(values: mean {x.mean():.2f}, std {x.std():.2f}, |x| max {np.abs(x).max():.1f})')
    torch.manual_seed(0)
    model = create_model('m2d_vit_base', img_size=[80, crop], patch_size=[16, 16])
    crops = torch.from_numpy(x[..., :crop])
    losses = []
    for batch in (crops, crops.half().float()):
        torch.manual_seed(1)  # the same masks
        normalised = (batch + 7.1) / 4.2
        with torch.no_grad():
            losses.append(float(model(normalised, mask_ratio=0.7)[0]))
    print(f'one M2D ViT-B step (batch 8, same weights and masks): loss {losses[0]:.6f} from float32, '
          f'{losses[1]:.6f} from float16 storage: difference {abs(losses[1] - losses[0]):.2e} '
          f'({abs(losses[1] - losses[0]) / losses[0]:.1e} relative)')


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--clips', type=int, nargs='+', default=[10_000, 100_000], help='corpus sizes')
    p.add_argument('--frames', type=int, default=100, help='frames per clip (1001: a 10 s AudioSet clip)')
    p.add_argument('--crop', type=int, default=64, help='crop frames (the published run: 608 of 1001)')
    p.add_argument('--samples', type=int, default=20_000, help='crops loaded per throughput measurement')
    p.add_argument('--workdir', default='/tmp/m2d_bench_data', help='where corpora are written (then deleted)')
    p.add_argument('--repeats', type=int, default=3, help='loader runs per measurement (the best is shown)')
    p.add_argument('--shard_clips', type=int, default=1000, help='clips per shard (the same at every corpus size)')
    p.add_argument('--dtype', default='float32', choices=['float32', 'float16'], help='stored precision of the shards')
    p.add_argument('--fp16', action='store_true', help='only measure what float16 storage changes')
    p.add_argument('--child', nargs='+', help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        kind, root, path, crop, *rest = args.child
        result = child_startup(Path(root), path, int(crop)) if kind == 'startup' else \
            child_loader(Path(root), path, int(crop), int(rest[0]))
        print(json.dumps(result))
        return
    if args.fp16:
        fp16_deviation(args.frames, args.crop)
        return

    from m2d.filelist import read_file_list
    from m2d.tools.pack import _NpyLoaderFactory, pack_folder
    from m2d.train.shard_set import ShardFiles, open_shards
    print(f'load {os.getloadavg()[0]:.2f}; {args.frames}-frame clips, {args.crop}-frame crops, batch {BATCH}')
    rates = {}
    for clips in args.clips:
        root = Path(args.workdir) / f'corpus-{clips}'
        shutil.rmtree(root, ignore_errors=True)
        try:
            t = time.perf_counter()
            make_corpus(root, clips, args.frames)
            written = time.perf_counter() - t
            t = time.perf_counter()
            pack_folder(read_file_list(root / 'files.csv'), root / 'shards', _NpyLoaderFactory(str(root)),
                        dtype=args.dtype, shard_clips=args.shard_clips, progress=False)
            packed = time.perf_counter() - t
            print(f'\n{clips} clips: .npy files written in {written:.0f} s, packed ({args.dtype}, 1 process) in '
                  f'{packed:.0f} s ({clips / packed:.0f} clips/s)')
            for path in ('published', 'shards'):
                for forget in (root / '.files.csv.checked.npz', root / 'cache'):
                    shutil.rmtree(forget, ignore_errors=True) if forget.is_dir() else forget.unlink(missing_ok=True)
                first = in_child('startup', str(root), path, str(args.crop))['seconds']
                again = in_child('startup', str(root), path, str(args.crop))['seconds']
                print(f'  {path:9s} start-up to the first batch: first start {first:.2f} s, '
                      f'repeated start {again:.2f} s')
            shards = ShardFiles(open_shards(str(root / 'shards'), 80), root / 'cache')
            for shard in range(len(shards.shards.counts)):  # checked (once, as by a first start): not timed below
                shards.handle(shard)
            shards.close()
            for cache in ('warm', 'cold'):
                for path in ('published', 'shards'):
                    runs = []
                    for _ in range(args.repeats):  # the best of a few: other jobs on the machine only slow a run
                        if cache == 'warm':  # read everything once: the page cache holds the corpus
                            subprocess.run(f'find {root} -type f -exec cat {{}} + > /dev/null', shell=True, check=True)
                        else:
                            evict(root)
                        runs.append(in_child('loader', str(root), path, str(args.crop), str(args.samples)))
                    r = max(runs, key=lambda run: run['samples_per_cpu_s'])
                    rates[(clips, path, cache)] = r
                    growth = r['peak_rss_mb'] - r['baseline_rss_mb']
                    print(f'  {path:9s} {cache}: {r["samples_per_s"]:7.0f} samples/s wall, '
                          f'{r["samples_per_cpu_s"]:7.0f} per CPU-second, peak RSS {r["peak_rss_mb"]:.0f} MB '
                          f'(+{growth:.0f} MB over the process before loading)')
        finally:
            shutil.rmtree(root, ignore_errors=True)

    from bench.mfu import PEAK_BF16_TFLOPS
    flops = step_flops(args.crop)
    print(f'\nM2D ViT-B training step, 80x{args.crop} crop: {flops / 1e9:.1f} GFLOP per sample (counted, forward '
          f'and backward); at {MFU:.0%} of the peak:')
    clips = args.clips[-1]
    for gpu in GPUS:
        peak = dict(PEAK_BF16_TFLOPS)[gpu]
        rate = peak * 1e12 * MFU / flops
        need = {f'{path} {cache}': rate / rates[(clips, path, cache)]['samples_per_s']
                for path in ('published', 'shards') for cache in ('warm', 'cold')}
        print(f'  {gpu} ({peak:g} TFLOP/s dense bf16): {rate:.0f} samples/s -> loader cores: '
              + ', '.join(f'{k} {v:.1f}' for k, v in need.items()) + f' (at {clips} clips)')


if __name__ == '__main__':
    main()
