"""Convert audio files to log-mel spectrogram (LMS) .npy files for pre-training (docs/pretraining.md).

    python wav_to_lms.py /your/local/fsd50k/FSD50K.dev_audio data/lms_fsd50kdev --csv data/files_fsd50k.csv
    m2d wav2lms /your/local/fsd50k/FSD50K.dev_audio data/lms_fsd50kdev --csv data/files_fsd50k.csv  # the same
    report = convert_folder('/your/local/fsd50k/FSD50K.dev_audio', 'data/lms_fsd50kdev')  # from Python
    write_file_list('data/lms_fsd50kdev', 'data/files_fsd50k.csv', data_path='data')

Every `*.wav` (or `suffix`) below the source folder becomes a float32 (1, 80, T) .npy at the same
relative path below the destination: 16 kHz mono as librosa.load(sr=16000, mono=True) gives it
(m2d.audio.io.load_audio), then m2d.audio.lms.LogMelSpectrogram, the front end RuntimeM2D.to_feature uses.

Speed: a few worker processes (one per core), each converting many files with a single torch
thread, so cores are never oversubscribed; each worker builds the mel front end once. Files are
converted one at a time: batching equal-length clips gained under 10% on the spectrogram alone at
one thread, and the spectrogram is a minority of the per-file time (decoding and resampling, writing).
"""
import argparse
import contextlib
import csv
import multiprocessing as mp
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import numpy as np
import torch
from tqdm import tqdm

from m2d.audio.io import MAX_SECONDS, add_max_seconds_argument, check_max_seconds, load_audio
from m2d.audio.lms import LogMelSpectrogram
from m2d.cli.common import describe_interrupt
from m2d.errors import AudioReadError, Interrupted, OutputError, UsageError, write_error_reason
from m2d.filelist import PathLike, leaves_folder, read_file_list
from m2d.outputs import DISK_WIDE_ERRORS, check_writable, writing
from m2d.shard_format import INDEX_NAME
from m2d.tools.pack import SHARD_CLIPS, ClipLoader, add_shard_arguments, pack_folder
from util.atomic import open_atomic, remove_stale_temp_files, save_npy_atomic
from util.cpu import usable_cores

SAMPLE_RATE = 16000

_worker_lms: Optional[LogMelSpectrogram] = None  # each worker process's own front end


@dataclass
class ConversionReport:
    """What convert_folder did. `failed` holds (source file, message naming the file and the reason)."""
    converted: list[Path] = field(default_factory=list)  # outputs written by this run
    skipped: list[Path] = field(default_factory=list)    # outputs that already existed
    failed: list[tuple[Path, str]] = field(default_factory=list)
    audio_seconds: float = 0.0                           # of the converted files, at 16 kHz

    @property
    def ok(self) -> bool:
        """True when the destination holds output for at least one source file (converted or existing)."""
        return bool(self.converted or self.skipped)

    def summary(self) -> str:
        s = self.audio_seconds
        duration = f'{s / 3600:.1f} h' if s >= 3600 else f'{s:.0f} s'
        lines = [f'converted {len(self.converted)} files ({duration} of audio), '
                 f'skipped {len(self.skipped)} already converted, {len(self.failed)} failed']
        lines += [f'  FAILED {message}' for _, message in self.failed]
        return '\n'.join(lines)


def output_path(src_file: Path, src: Path, dst: Path, suffix: str) -> Path:
    """SRC/a/b.wav -> DST/a/b.npy (the relative path kept, `suffix` replaced by .npy; a listed file with
    another ending has its own extension replaced)."""
    rel = src_file.relative_to(src).as_posix()
    return dst / ((rel[:-len(suffix)] if rel.endswith(suffix) else os.path.splitext(rel)[0]) + '.npy')


def list_sources(src: PathLike, suffix: str = '.wav') -> list[Path]:
    """Files below `src` (recursively, sorted) whose names end with `suffix` (case-sensitive)."""
    return sorted(p for p in Path(src).rglob(f'*{suffix}') if p.is_file())


def audio_to_lms(src_file: PathLike, to_lms: LogMelSpectrogram, min_samples: int = 0,
                 max_seconds: Optional[float] = None) -> tuple[np.ndarray, int]:
    """Audio file -> (float32 LMS (1, 80, T), its 16 kHz sample count). Audio shorter than `min_samples` is
    right-padded with zeros (silence) first. Raises AudioReadError naming the file when it cannot be read, is
    longer than `max_seconds` or too short for one STFT frame."""
    wav = load_audio(src_file, SAMPLE_RATE, max_seconds)
    if wav.shape[0] < min_samples:
        wav = np.pad(wav, (0, min_samples - wav.shape[0]))
    shortest = to_lms.melspec.n_fft // 2 + 1  # centred frames reflect-pad n_fft // 2 samples
    if wav.shape[0] < shortest:
        raise AudioReadError(f'{src_file}: {wav.shape[0]} samples at {SAMPLE_RATE} Hz is too short for one '
                             f'frame (needs {shortest}); pad short clips with --min_length')
    with torch.inference_mode():
        return to_lms(torch.from_numpy(wav)[None]).numpy(), wav.shape[0]  # [1, 80, T]


def convert_file(src_file: PathLike, dst_file: PathLike, to_lms: LogMelSpectrogram, min_samples: int = 0,
                 max_seconds: Optional[float] = None) -> int:
    """Audio file -> float32 (1, 80, T) .npy, written atomically (see audio_to_lms). Returns the 16 kHz
    sample count. Raises AudioReadError for unreadable audio and OSError when the output cannot be written."""
    lms, samples = audio_to_lms(src_file, to_lms, min_samples, max_seconds)
    save_npy_atomic(lms, dst_file)
    return samples


def _init_worker() -> None:
    global _worker_lms
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches every worker: the parent alone handles it
    torch.set_num_threads(1)  # one process per core; more threads per process only contend
    _worker_lms = LogMelSpectrogram()


def _convert_job(job: tuple[int, str, str, int, float]) -> tuple[int, int, Optional[str]]:
    """(index, src, dst, min_samples, max_seconds) -> (index, samples, None) or (index, 0, error message).

    Raises OSError(errno, strerror, dst) when the disk is full or read-only, which every later file would meet too.
    """
    index, src_file, dst_file, min_samples, max_seconds = job
    try:
        return index, convert_file(src_file, dst_file, _worker_lms, min_samples, max_seconds), None
    except AudioReadError as e:
        return index, 0, str(e)
    except OSError as e:  # from writing: load_audio raises AudioReadError
        if e.errno in DISK_WIDE_ERRORS:
            raise OSError(e.errno, e.strerror, dst_file) from None
        return index, 0, f'{src_file}: cannot write {dst_file}: {write_error_reason(e)}'
    except Exception as e:  # one bad file must not stop the others; report it by name
        return index, 0, f'{src_file}: {type(e).__name__}: {e}'


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _run_jobs(jobs: list[tuple[int, str, str, int, float]], workers: int) -> Iterator[tuple[int, int, Optional[str]]]:
    """Results of _convert_job for all jobs, in completion order: in this process for one worker,
    else in a pool. forkserver (spawn where unavailable) keeps workers free of the caller's threads."""
    if workers <= 1:
        global _worker_lms
        with _torch_threads(1):  # the same numerics as a pool worker
            _worker_lms = _worker_lms or LogMelSpectrogram()
            yield from map(_convert_job, jobs)
        return
    method = 'forkserver' if 'forkserver' in mp.get_all_start_methods() else 'spawn'
    ctx = mp.get_context(method)
    if method == 'forkserver':  # import torch once in the server, not once per worker
        ctx.set_forkserver_preload(['__main__', __name__])
    chunksize = max(1, min(32, len(jobs) // (4 * workers)))
    with ctx.Pool(workers, initializer=_init_worker) as pool:
        yield from pool.imap_unordered(_convert_job, jobs, chunksize=chunksize)


def convert_folder(src: PathLike, dst: PathLike, suffix: str = '.wav', workers: Optional[int] = None,
                   min_length: float = 0.0, verbose: bool = False, progress: bool = True,
                   files: Optional[Sequence[str]] = None, skip: int = 0,
                   max_seconds: float = MAX_SECONDS) -> ConversionReport:
    """Convert every `*suffix` file below `src` (or only `files`, paths relative to `src`) to
    `dst`/<same relative path>.npy, float32 (1, 80, T).

    Outputs that already exist are skipped; files that cannot be read (missing, corrupt, truncated,
    empty, NaN, longer than `max_seconds` by their header) or written are reported in the returned
    report's `failed` and skipped; a full or read-only disk raises OutputError. `min_length` > 0 right-pads
    shorter audio with silence to that many seconds (the published script's default was 6.1).
    `workers`: processes to use (default: all cores); 1 converts in this process. `skip`: leave out
    the first that many sources (sorted), as the published script's --skip did. Temporary files that
    a killed earlier run left in `dst` are removed first. Ctrl-C raises Interrupted saying how far it got.
    """
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise NotADirectoryError(f'source folder not found: {src}')
    if not suffix:
        raise UsageError("suffix must not be empty (e.g. '.wav', '.flac')")
    workers = usable_cores() if workers is None else int(workers)
    if workers < 1:
        raise UsageError(f'workers must be >= 1, got {workers}')
    if min_length < 0:
        raise UsageError(f'min_length must be >= 0 seconds, got {min_length}')
    if skip < 0:
        raise UsageError(f'skip must be >= 0, got {skip}')
    check_max_seconds(max_seconds)
    min_samples = int(SAMPLE_RATE * min_length)
    if files is not None:
        outside = [f for f in files if leaves_folder(str(f))]
        if outside:
            raise UsageError(f'{len(outside)} listed files are not below {src} (absolute or with ..), e.g. '
                             f'{outside[:3]}; list paths relative to the source folder')
    if dst.is_dir():
        remove_stale_temp_files(dst, recursive=True)

    report = ConversionReport()
    sources, jobs = [], []
    listed = list_sources(src, suffix) if files is None else sorted({src / f for f in files})
    for src_file in listed[skip:]:
        dst_file = output_path(src_file, src, dst, suffix)
        if dst_file.exists():
            report.skipped.append(dst_file)
        elif not src_file.exists():
            report.failed.append((src_file, f'{src_file}: missing'))
        else:
            jobs.append((len(sources), str(src_file), str(dst_file), min_samples, max_seconds))
            sources.append((src_file, dst_file))
    workers = min(workers, max(1, len(jobs)))
    if progress:
        what = f'{suffix} files' if files is None else 'listed files'
        print(f'{src} -> {dst}: {len(jobs)} {what} to convert, {len(report.skipped)} already converted, '
              f'{workers} worker(s)', file=sys.stderr)

    with tqdm(total=len(jobs), unit='file', disable=not progress or not jobs) as bar:
        try:
            for index, samples, error in _run_jobs(jobs, workers):
                src_file, dst_file = sources[index]
                if error is None:
                    report.converted.append(dst_file)
                    report.audio_seconds += samples / SAMPLE_RATE
                    if verbose:
                        bar.write(f'{src_file} -> {dst_file} (1, 80, {1 + samples // 160})', file=sys.stderr)
                else:
                    report.failed.append((src_file, error))
                bar.update()
        except KeyboardInterrupt:
            raise Interrupted(describe_interrupt(len(report.converted), len(jobs), 'converted')) from None
        except OSError as e:  # from _convert_job: the disk is full or read-only; e.filename is the output
            raise OutputError(e.filename, e, describe_interrupt(len(report.converted), len(jobs), 'converted')) \
                from None
    report.converted.sort()
    report.failed.sort()
    return report


def check_inside(folder: PathLike, data_path: PathLike) -> None:
    """Raise ValueError unless `folder` is `data_path` or below it (compared as written, so a symlinked
    folder inside `data_path` counts as inside)."""
    folder, base = os.path.abspath(folder), os.path.abspath(data_path)
    if os.path.commonpath([folder, base]) != base:
        raise UsageError(f'{folder} is not inside the data folder {base}: file names in the CSV are relative to '
                         f'--data_path, so put the LMS folder below it (e.g. {data_path}/lms_mydata) or set '
                         f'--data_path to a folder above it')


def write_file_list(lms_dirs: Union[PathLike, Sequence[PathLike]], csv_path: PathLike,
                    data_path: PathLike = 'data') -> list[str]:
    """Write the pre-training list: a CSV with one `file_name` column holding every .npy below
    `lms_dirs`, as paths relative to `data_path`, sorted (train_audio.py --data_path D --dataset CSV).

    Returns the names. Raises ValueError when a folder is not below `data_path` or holds no .npy.
    """
    dirs = [lms_dirs] if isinstance(lms_dirs, (str, Path)) else list(lms_dirs)
    base = os.path.abspath(data_path)
    names = []
    for folder in dirs:
        check_inside(folder, data_path)
        names += [Path(os.path.relpath(p, base)).as_posix() for p in Path(folder).rglob('*.npy') if p.is_file()]
    if not names:
        raise UsageError(f'no .npy files below {", ".join(map(str, dirs))}; nothing to list')
    names.sort()
    with open_atomic(csv_path, 'w') as f:
        writer = csv.writer(f, lineterminator='\n')
        writer.writerow(['file_name'])
        writer.writerows([name] for name in names)
    return names


def main(src: str, dst: str, suffix: str = '.wav', workers: Optional[int] = None, csv: Optional[str] = None,
         data_path: str = 'data', min_length: float = 0.0, verbose: bool = False, files: Optional[str] = None,
         skip: int = 0, max_seconds: float = MAX_SECONDS, shards: bool = False, dtype: str = 'float32',
         shard_clips: int = SHARD_CLIPS, seed: int = 0) -> int:
    """Convert audio below SRC (or the files a list names) to LMS .npy files below DST (with shards=True,
    into a shard set at DST, as m2d pack makes); see add_arguments.

    Returns the exit status: 0, or 1 when DST ends up with no output for any source file (no inputs,
    or all failed). Raises UsageError for bad arguments, a bad list or an unwritable output, before
    converting anything; OutputError (a UsageError) when the disk fills up or turns read-only while
    converting; Interrupted on Ctrl-C.
    """
    src, dst = str(src), str(dst)
    if shards:
        if csv is not None:
            raise UsageError('--csv lists .npy files; a shard set lists its clips in DST/index.json (drop --csv)')
        names = None if files is None else read_file_list(files, 'file list', 'SRC')
        return pack_audio(src, dst, suffix, workers, min_length, names, skip, max_seconds, dtype, shard_clips, seed)
    try:
        names = None if files is None else read_file_list(files, 'file list', 'SRC')
        check_writable(dst, folder=True)
        if csv is not None:  # fail before converting, not after
            check_inside(dst, data_path)
            check_writable(csv)
        report = convert_folder(src, dst, suffix=suffix, workers=workers, min_length=float(min_length),
                                verbose=verbose, files=names, skip=skip, max_seconds=max_seconds)
    except OSError as e:  # the source folder cannot be read
        raise UsageError(str(e)) from None
    print(report.summary(), file=sys.stderr)
    if not report.ok:
        found = len(report.failed)
        what = f'{suffix} files' if files is None else 'listed files'
        print(f'error: no {what} found below {src} (set --suffix for other types)' if not found
              else f'error: all {found} {what} failed to convert', file=sys.stderr)
        return 1
    if csv is not None:
        with writing(csv):
            names = write_file_list(dst, csv, data_path)
        print(f'wrote {csv}: {len(names)} files (file_name relative to {data_path})', file=sys.stderr)
    return 0


@dataclass
class _AudioLoader:
    """Picklable make_loader of m2d.tools.pack: audio files below `src` -> LMS, one torch thread per worker."""
    src: str
    min_samples: int
    max_seconds: float

    def __call__(self) -> ClipLoader:
        torch.set_num_threads(1)  # one process per core
        to_lms = LogMelSpectrogram()
        return lambda name: audio_to_lms(Path(self.src) / name, to_lms, self.min_samples, self.max_seconds)[0]


def pack_audio(src: str, dst: str, suffix: str, workers: Optional[int], min_length: float,
               names: Optional[list[str]], skip: int, max_seconds: float, dtype: str, shard_clips: int,
               seed: int) -> int:
    """`wav2lms --shards`: audio below SRC (or the listed files) -> a shard set at DST (m2d.tools.pack)."""
    if not Path(src).is_dir():
        raise UsageError(f'source folder not found: {src}')
    check_max_seconds(max_seconds)
    if min_length < 0 or skip < 0:
        raise UsageError(f'--min_length and --skip must be >= 0, got {min_length} and {skip}')
    listed = [p.relative_to(src).as_posix() for p in list_sources(src, suffix)] if names is None else sorted(set(names))
    if not listed[skip:]:
        print(f'error: no {suffix if names is None else "listed"} files found below {src}', file=sys.stderr)
        return 1
    with _torch_threads(torch.get_num_threads()):  # one worker loads in this process: its thread count is restored
        report = pack_folder(listed[skip:], dst, _AudioLoader(src, int(SAMPLE_RATE * min_length), max_seconds), 80,
                             dtype, shard_clips, seed, usable_cores() if workers is None else workers, source=src)
    print(report.summary(), file=sys.stderr)
    print(f'wrote {Path(dst) / INDEX_NAME}: train with --shards {dst}', file=sys.stderr)
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('src', metavar='SRC', help='source folder, searched recursively for --suffix files')
    parser.add_argument('dst', metavar='DST', help='destination folder: SRC/a/b.wav becomes DST/a/b.npy')
    parser.add_argument('--suffix', default='.wav', help='ending of the files to convert (case-sensitive)')
    parser.add_argument('--files', default=None,
                        help="convert only the files this list names (a CSV with a 'file_name' column, or one path "
                             'per line), as paths relative to SRC; --suffix does not apply (default: every --suffix '
                             'file below SRC)')
    parser.add_argument('--workers', type=int, default=None, help='worker processes (default: all cores)')
    parser.add_argument('--csv', default=None,
                        help='also write the pre-training file list of every .npy below DST (DST must be inside '
                             '--data_path), for `m2d train --dataset CSV --data_path ...` (default: none, no list)')
    parser.add_argument('--data_path', default='data',
                        help="the data folder: --csv's paths are relative to it, as `m2d train --data_path` reads them")
    parser.add_argument('--min_length', type=float, default=0.0,
                        help='right-pad shorter audio with silence to this many seconds (the published script: 6.1)')
    parser.add_argument('--skip', type=int, default=0, help='leave out the first N source files (sorted)')
    add_max_seconds_argument(parser)
    parser.add_argument('--verbose', action='store_true', help='print every converted file with its shape')
    parser.add_argument('--shards', action='store_true',
                        help='write DST as a shard set for training at scale (as m2d pack makes; no .npy files): '
                             'see docs/data-at-scale.md')
    add_shard_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """`m2d wav2lms` / wav_to_lms.py."""
    return main(**vars(args))
