"""Pack a pre-training data set into shards: a CSV of LMS .npy files -> a folder of tar shards and index.json.

    m2d pack data/files_audioset.csv data/shards_audioset --data_path data
    m2d wav2lms /your/audioset data/shards_audioset --shards          # from audio, without .npy files
    m2d train --shards data/shards_audioset ...                      # or an http(s)://, gs://, pipe: URL

Shards are standard WebDataset tar files (`shard-000000.tar`; each clip a member `<position>.npy`, the
(1, F, T) LMS as float32 or float16, in Fortran order: frame after frame, so that training reads a crop as
one range of bytes), readable by any WebDataset pipeline. index.json lists every shard
with its size, SHA-256, and each clip's byte offset and frame count, so training reads any clip by
offset (memory-mapped) and checks a shard without opening the clips; it also holds the mean and std of
every stored value (the normalisation stats training uses unless --norm_stats is given). Each shard's
`shard-NNNNNN.json` holds its record and the source names of its clips.

Clips go into shards in a seeded random order (--seed), --shard_clips per shard, so each shard is a
random sample of the corpus. Every clip is validated once, here: shape (1, n_mels, T), finite values;
bad ones are reported by name and left out, the rest go on. Each shard is written atomically (a
temporary file renamed into place once complete); a rerun skips finished shards, so an interrupted pack
resumes where it stopped and nothing written is lost. See docs/data-at-scale.md.
"""
import argparse
import contextlib
import hashlib
import io
import json
import multiprocessing as mp
import signal
import sys
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Callable, Iterator, Optional, Sequence

import numpy as np
import webdataset
from tqdm import tqdm

from m2d.errors import Interrupted, OutputError, UsageError
from m2d.filelist import PathLike, read_file_list
from m2d.outputs import DISK_WIDE_ERRORS, check_writable, writing
from m2d.shard_format import DTYPES, FORMAT, INDEX_NAME, VERSION, shard_name
from m2d.train.data import lms_problem
from util.atomic import open_atomic, remove_stale_temp_files
from util.cpu import usable_cores

SHARD_CLIPS = 1000  # 10 s clips: 320 MB shards in float32, 160 MB in float16
FLOAT16_MAX = float(np.finfo(np.float16).max)

ClipLoader = Callable[[str], np.ndarray]  # source name -> (1, F, T) float array


def clip_problem(lms: np.ndarray, n_mels: int, dtype: str) -> Optional[str]:
    """Why `lms` cannot be packed as a (1, n_mels, T) clip of finite `dtype` values (lms_problem, and the
    range of float16), or None."""
    problem = lms_problem(lms, n_mels)
    if problem is None and dtype == 'float16' and float(np.abs(lms).max()) > FLOAT16_MAX:
        return f'values beyond float16 range (|x| > {FLOAT16_MAX:g}); pack with --dtype float32'
    return problem


def npy_loader(data_path: PathLike) -> ClipLoader:
    """A ClipLoader of .npy files relative to data_path."""
    root = Path(data_path)
    return lambda name: np.load(root / name)


class _HashingWriter:
    """A write-only stream that passes bytes on to `f`, counting them and hashing them (SHA-256)."""

    def __init__(self, f: IO[bytes]):
        self.f, self.sha256, self.bytes = f, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.f.write(data)
        self.sha256.update(data)
        self.bytes += len(data)
        return len(data)


class ShardWriter:
    """Writes one shard: clips appended as `<position>.npy` members of a WebDataset tar (webdataset's
    TarWriter), atomically; record() -> its index record (bytes, sha256, each clip's data offset and
    frames, and the sum, sum of squares and count of the stored values, for the normalisation stats)."""

    def __init__(self, f: IO[bytes], dtype: str):
        self.out = _HashingWriter(f)
        self.tar = webdataset.TarWriter(self.out, encoder=False, mtime=0)  # mtime 0: a repacked shard is identical
        self.dtype = dtype
        self.offsets, self.frames = [], []
        self.sum = self.sumsq = 0.0
        self.count = 0

    def add(self, lms: np.ndarray, position: int) -> None:
        stored = np.asfortranarray(lms, dtype=self.dtype)  # frame by frame: a crop is one range of bytes
        npy = io.BytesIO()
        np.save(npy, stored)
        header = npy.tell() - stored.nbytes
        # A member is a 512-byte header (names of 13 characters need no extension) and its data in
        # 512-byte blocks: the values start there, after the .npy header.
        self.offsets.append(self.tar.tarstream.offset + tarfile.BLOCKSIZE + header)
        self.frames.append(int(stored.shape[-1]))
        self.tar.write({'__key__': f'{position:09d}', 'npy': npy.getvalue()})
        values = stored.astype(np.float64)
        self.sum += float(values.sum())
        self.sumsq += float(np.square(values).sum())
        self.count += values.size

    def close(self) -> None:
        """Finish the tar (its end blocks): before the file closes, also when packing failed."""
        self.tar.close()

    def record(self, name: str) -> dict:
        self.close()
        return dict(name=name, bytes=self.out.bytes, sha256=self.out.sha256.hexdigest(), samples=len(self.offsets),
                    offsets=self.offsets, frames=self.frames, sum=self.sum, sumsq=self.sumsq, count=self.count)


@dataclass
class PackJob:
    number: int              # shard number
    names: list[str]         # source names, in pack order
    first_position: int      # pack position of the first clip (tar member names)
    out: str
    n_mels: int
    dtype: str


_worker_loader: Optional[ClipLoader] = None  # set in each worker process (pack_folder's loader factory)


def _init_worker(make_loader: Callable[[], ClipLoader]) -> None:
    global _worker_loader
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches every worker: the parent handles it
    _worker_loader = make_loader()


def pack_shard(job: PackJob, load: Optional[ClipLoader] = None) -> dict:
    """Load, validate and write one shard; -> its record, with 'names' (packed) and 'failed' [[name, why]].
    The record goes to shard-NNNNNN.json (atomically) after the shard itself. Raises OSError when the
    output cannot be written."""
    load = load or _worker_loader
    out = Path(job.out)
    names, failed = [], []
    with open_atomic(out / shard_name(job.number)) as f:
        writer = ShardWriter(f, job.dtype)
        with contextlib.closing(writer):
            for name in job.names:
                try:
                    lms = load(name)
                except FileNotFoundError:
                    failed.append([name, 'missing'])
                    continue
                except Exception as e:  # one bad file must not stop the others; report it by name
                    failed.append([name, f'unreadable ({type(e).__name__}: {e})'])
                    continue
                problem = clip_problem(lms, job.n_mels, job.dtype)
                if problem:
                    failed.append([name, problem])
                    continue
                writer.add(lms, job.first_position + len(names))
                names.append(name)
        record = writer.record(shard_name(job.number))
    record.update(n_mels=job.n_mels, dtype=job.dtype, names=names, failed=failed, planned=job.names)
    with open_atomic(out / shard_name(job.number).replace('.tar', '.json'), 'w') as f:
        json.dump(record, f)
    return record


def finished_record(out: Path, job: PackJob) -> Optional[dict]:
    """The record of shard job.number if an earlier run finished it as this pack plans it (same clips,
    dtype, n_mels), with nothing failed, and the shard still has its recorded size; else None."""
    try:
        record = json.loads((out / shard_name(job.number).replace('.tar', '.json')).read_text())
        size = (out / shard_name(job.number)).stat().st_size
    except (OSError, ValueError):
        return None
    same_plan = record.get('planned') == job.names and record.get('dtype') == job.dtype \
        and record.get('n_mels') == job.n_mels
    if same_plan and not record.get('failed') and size == record.get('bytes'):
        return record
    return None


def plan_jobs(names: Sequence[str], out: Path, n_mels: int, dtype: str, shard_clips: int, seed: int) -> list[PackJob]:
    """Shards of shard_clips clips each, the clips in a seeded random order of the sorted names."""
    order = np.random.default_rng(seed).permutation(len(names))
    shuffled = [names[i] for i in order]
    return [PackJob(n, shuffled[start:start + shard_clips], start, str(out), n_mels, dtype)
            for n, start in enumerate(range(0, len(shuffled), shard_clips))]


def _run(jobs: list[PackJob], workers: int, make_loader: Callable[[], ClipLoader]) -> Iterator[dict]:
    if workers <= 1:
        load = make_loader()
        yield from (pack_shard(job, load) for job in jobs)
        return
    ctx = mp.get_context('forkserver' if 'forkserver' in mp.get_all_start_methods() else 'spawn')
    with ctx.Pool(workers, initializer=_init_worker, initargs=(make_loader,)) as pool:
        yield from pool.imap_unordered(pack_shard, jobs)


@dataclass
class PackReport:
    shards: list[dict] = field(default_factory=list)  # every shard's record, in shard order
    packed: int = 0                                     # shards written by this run
    reused: int = 0                                     # shards an earlier run finished

    @property
    def failed(self) -> list[list[str]]:
        return [f for record in self.shards for f in record['failed']]

    def summary(self) -> str:
        clips = sum(r['samples'] for r in self.shards)
        lines = [f'{clips} clips in {len(self.shards)} shards ({self.packed} written now, {self.reused} already '
                 f'done), {len(self.failed)} files failed']
        lines += [f'  FAILED {name}: {why}' for name, why in self.failed]
        return '\n'.join(lines)


def pack_folder(names: Sequence[str], out: PathLike, make_loader: Callable[[], ClipLoader], n_mels: int = 80,
                dtype: str = 'float32', shard_clips: int = SHARD_CLIPS, seed: int = 0, workers: int = 1,
                progress: bool = True, source: str = '') -> PackReport:
    """Pack the clips `make_loader()` loads by name into shards in `out` and write out/index.json.

    make_loader: a picklable factory, called once per worker process. Finished shards of an earlier run
    with the same plan are kept; shards with failed clips are packed again (the files may be fixed).
    Raises UsageError for bad settings or when no clip could be packed, OutputError when the disk fills
    up, Interrupted on Ctrl-C (saying how far it got; a rerun continues).
    """
    out = Path(out)
    if dtype not in DTYPES:
        raise UsageError(f'dtype must be one of {", ".join(DTYPES)}, got {dtype!r}')
    if shard_clips < 1:
        raise UsageError(f'shard_clips must be at least 1, got {shard_clips}')
    if workers < 1:
        raise UsageError(f'--workers must be at least 1, got {workers}')
    check_writable(out, folder=True)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(out)
    jobs = plan_jobs(list(names), out, n_mels, dtype, shard_clips, seed)
    records: dict[str, dict] = {}  # shard name -> record
    todo = []
    for job in jobs:
        done = finished_record(out, job)
        if done is None:
            todo.append(job)
        else:
            records[done['name']] = done
    report = PackReport(reused=len(records))
    if progress:
        print(f'{source or "clips"} -> {out}: {len(names)} clips in {len(jobs)} shards of {shard_clips}; '
              f'{len(todo)} to write, {len(records)} already done', file=sys.stderr)
    with tqdm(total=len(todo), unit='shard', disable=not progress or not todo) as bar:
        try:
            for record in _run(todo, min(workers, max(1, len(todo))), make_loader):
                records[record['name']] = record
                report.packed += 1
                bar.update()
        except KeyboardInterrupt:
            raise Interrupted(f'{report.packed} of {len(todo)} shards packed, rerun the same command to continue') \
                from None
        except OSError as e:
            if e.errno in DISK_WIDE_ERRORS:
                raise OutputError(out, e, f'{report.packed} of {len(todo)} shards packed, rerun the same command to '
                                          'continue') from None
            raise
    report.shards = [records[shard_name(job.number)] for job in jobs]
    if not any(r['samples'] for r in report.shards):
        raise UsageError(f'no clip could be packed ({len(report.failed)} failed, e.g. '
                         f'{": ".join(report.failed[0]) if report.failed else "none listed"})')
    write_index(out, report.shards, n_mels, dtype, seed)
    return report


def write_index(out: Path, records: list[dict], n_mels: int, dtype: str, seed: int) -> Path:
    """out/index.json: the shard set's format, shape, dtype, normalisation stats and per-shard records
    (without the source names, which stay in the shards' own .json)."""
    count = sum(r['count'] for r in records)
    mean = sum(r['sum'] for r in records) / count
    var = max(sum(r['sumsq'] for r in records) / count - mean * mean, 0.0)
    keep = ('name', 'bytes', 'sha256', 'samples', 'n_mels', 'dtype', 'offsets', 'frames')
    index = dict(format=FORMAT, version=VERSION, n_mels=n_mels, dtype=dtype, seed=seed,
                 samples=sum(r['samples'] for r in records), norm_stats=[mean, float(np.sqrt(var))],
                 shards=[{k: r[k] for k in keep} for r in records])
    with writing(out / INDEX_NAME), open_atomic(out / INDEX_NAME, 'w') as f:
        json.dump(index, f, separators=(',', ':'))
    return out / INDEX_NAME


def add_shard_arguments(parser: argparse.ArgumentParser) -> None:
    """The options `m2d pack` and `m2d wav2lms --shards` share."""
    parser.add_argument('--dtype', default='float32', choices=DTYPES,
                        help='stored precision: float32 stores the values exactly; float16 halves the bytes (for '
                             'network storage) at a small rounding and more loader CPU (docs/data-at-scale.md)')
    parser.add_argument('--shard_clips', type=int, default=SHARD_CLIPS, help='clips per shard')
    parser.add_argument('--seed', type=int, default=0, help='seed of the order in which clips go into shards')


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('dataset', help="the pre-training CSV ('file_name' column, paths relative to --data_path)")
    parser.add_argument('dst', help='shard folder to write (index.json, shard-NNNNNN.tar)')
    parser.add_argument('--data_path', default='data', help='the folder the CSV paths are relative to')
    parser.add_argument('--n_mels', type=int, default=80, help='mel bins F of every clip (1, F, T)')
    add_shard_arguments(parser)
    parser.add_argument('--workers', type=int, default=None, help='worker processes (default: all cores)')


def run(args: argparse.Namespace) -> int:
    """`m2d pack`: 0 when the index was written (files that failed are listed), else an error."""
    names = read_file_list(args.dataset)
    report = pack_folder(names, args.dst, _NpyLoaderFactory(args.data_path), args.n_mels, args.dtype,
                         args.shard_clips, args.seed, usable_cores() if args.workers is None else args.workers,
                         source=args.dataset)
    print(report.summary(), file=sys.stderr)
    print(f'wrote {Path(args.dst) / INDEX_NAME}: train with --shards {args.dst}', file=sys.stderr)
    return 0


@dataclass
class _NpyLoaderFactory:
    """Picklable make_loader for .npy files (worker processes rebuild the loader)."""
    data_path: str

    def __call__(self) -> ClipLoader:
        return npy_loader(self.data_path)
