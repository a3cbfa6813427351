"""Benchmark behind the choice of shard library (docs/data-at-scale.md): one process reading random crops
of the same clips through each candidate's own reader.

    python -m venv /tmp/libs
    echo $PWD/.venv/lib/python3.11/site-packages > /tmp/libs/lib/python3.11/site-packages/m2d.pth
    /tmp/libs/bin/pip install --no-deps mosaicml-streaming==0.13.0 litdata==0.2.76 xxhash zstd python-snappy \
        cramjam brotli lightning-utilities boto3 botocore s3transfer jmespath obstore tifffile catalogue
    /tmp/libs/bin/python -m bench.compare_shard_libraries --clips 3000

The candidates are not m2d's dependencies (mosaicml-streaming pins numpy<2.2), hence the scratch venv
layered over the project's. Writes --clips clips of (1, 80, 1001) as .npy files (float32, the published
path) and, in float16, as MDS shards (mosaicml-streaming), litdata chunks, and WebDataset tars (m2d
pack); then reads them all in a shuffled order, each reader in a fresh process, warm (in the page cache)
and cold (evicted), and prints crops per second of wall time and of CPU time, and peak RSS (the best of
two runs). The RSS includes what each reader imports (torch for all but the .npy reader).
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

from bench.bench_data import evict, peak_rss_mb

os.environ.setdefault('LITDATA_DISABLE_VERSION_CHECK', '1')  # else litdata asks PyPI at every dataset it makes
F, T, CROP = 80, 1001, 608


def crop(x: np.ndarray) -> np.ndarray:
    x = x.reshape(1, F, -1)
    start = np.random.randint(x.shape[-1] - CROP)
    return np.array(x[..., start:start + CROP], dtype=np.float32)


def write(root: Path, clips: int) -> None:
    from litdata.streaming.cache import Cache
    from streaming import MDSWriter

    from m2d.tools.pack import npy_loader, pack_folder
    (root / 'npy').mkdir(parents=True)
    mds = MDSWriter(out=str(root / 'mds'), columns={'lms': 'ndarray:float16'}, size_limit=1 << 27, hashes=['xxh64'])
    lit = Cache(str(root / 'lit'), chunk_bytes=1 << 27)
    rng = np.random.default_rng(0)
    for i in range(clips):
        x = (rng.standard_normal((1, F, T)) - 5).astype(np.float32)
        np.save(root / 'npy' / f'{i:06d}.npy', x)
        mds.write({'lms': x.astype(np.float16)})
        lit[i] = x.astype(np.float16)
    mds.finish()
    lit.done()
    lit.merge()
    pack_folder([f'{i:06d}.npy' for i in range(clips)], root / 'wds', lambda: npy_loader(root / 'npy'),
                dtype='float16', shard_clips=800, progress=False)


def readers(root: Path) -> dict:
    def published():
        files = sorted((root / 'npy').glob('*.npy'))
        for i in np.random.permutation(len(files)):
            yield crop(np.load(files[i], mmap_mode='r'))

    def mosaic():
        from streaming import StreamingDataset
        for sample in StreamingDataset(local=str(root / 'mds'), shuffle=True, batch_size=1):
            yield crop(sample['lms'])

    def litdata():
        from litdata import StreamingDataset
        for sample in StreamingDataset(str(root / 'lit'), shuffle=True):
            yield crop(sample)

    def webdataset_pipeline():
        import webdataset
        urls = sorted(str(p) for p in (root / 'wds').glob('*.tar'))
        for sample in webdataset.WebDataset(urls, shardshuffle=len(urls), empty_check=False).shuffle(1000).decode():
            yield crop(sample['npy'])

    def m2d_shards():
        from m2d.train.data import crop_or_pad
        from m2d.train.shard_set import ShardFiles, open_shards
        from m2d.train.shards import epoch_batches
        shards = open_shards(str(root / 'wds'), F)
        files = ShardFiles(shards, root / 'cache')
        for sample in epoch_batches(shards.counts, 0, 0, 1, 0, 1).ravel():
            yield crop_or_pad(files.read(int(sample), *files.crop(int(sample), CROP)), 0, CROP)  # float32, like crop()

    return {'published .npy': published, 'mosaicml-streaming': mosaic, 'litdata': litdata,
            'webdataset pipeline': webdataset_pipeline, 'm2d shards (webdataset tars)': m2d_shards}


def child(root: Path, name: str, cold: bool) -> dict:
    samples = readers(root)[name]()
    next(samples)  # start-up (imports, index reading, threads) is not what is compared
    if cold:
        evict(root)
    wall, cpu, n = time.perf_counter(), time.process_time(), 0
    for _ in samples:
        n += 1
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {'per_s': n / wall, 'per_cpu_s': n / cpu, 'rss_mb': peak_rss_mb()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--clips', type=int, default=3000)
    p.add_argument('--workdir', default='/tmp/m2d_compare_shards')
    p.add_argument('--child', nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(Path(args.child[0]), args.child[1], args.child[2] == 'cold')))
        return
    root = Path(args.workdir)
    shutil.rmtree(root, ignore_errors=True)
    try:
        write(root, args.clips)
        print(f'load {os.getloadavg()[0]:.2f}; {args.clips} clips of (1, {F}, {T}), {CROP}-frame crops, one process')
        for name in readers(root):
            for cache in ('warm', 'cold'):
                runs = []
                for _ in range(2):  # the best of two: other jobs on the machine only slow a run
                    done = subprocess.run([sys.executable, '-m', 'bench.compare_shard_libraries', '--child',
                                           str(root), name, cache], capture_output=True, text=True, check=True)
                    runs.append(json.loads(done.stdout.splitlines()[-1]))
                r = max(runs, key=lambda run: run['per_cpu_s'])
                print(f'{name:30s} {cache}: {r["per_s"]:6.0f} crops/s wall, {r["per_cpu_s"]:6.0f} per CPU-second, '
                      f'peak RSS {r["rss_mb"]:.0f} MB')
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == '__main__':
    main()
