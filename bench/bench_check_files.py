"""Benchmark: the pre-training pre-flight scan (m2d.train.data.check_files), which reads every value of every file.

    python -m bench.bench_check_files --n_files 2000 --frames 1001

Writes n_files LMS files of (1, 80, frames) to a temporary folder, scans them once to fill the page
cache, then prints files/s and GB/s of three scans from the cache. Reading from disk is bounded by
the disk's read speed instead.
"""
import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from m2d.train.data import check_files


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--n_files', type=int, default=2000, help='files to scan')
    p.add_argument('--frames', type=int, default=1001, help='frames per file (1001: a 10 s clip)')
    p.add_argument('--repeats', type=int, default=3, help='timed scans')
    args = p.parse_args()
    x = (np.random.default_rng(0).standard_normal((1, 80, args.frames)) - 5).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        names = [f'{i:06d}.npy' for i in range(args.n_files)]
        for name in names:
            np.save(Path(tmp) / name, x)
        check_files(names, tmp, 80)
        for _ in range(args.repeats):
            start = time.perf_counter()
            check_files(names, tmp, 80)
            seconds = time.perf_counter() - start
            print(f'{args.n_files / seconds:.0f} files/s, {args.n_files * x.nbytes / seconds / 1e9:.2f} GB/s')


if __name__ == '__main__':
    main()
