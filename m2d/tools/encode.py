"""Encode audio files into M2D embeddings saved as .npy files (`m2d encode WEIGHT_FILE INPUT OUTPUT`).

INPUT is one audio file or a folder searched recursively for .wav/.flac/.ogg files of any sample
rate and channel count (mixed to mono and resampled to 16 kHz as the runtime expects). Input
`INPUT/a/b.wav` is written to `OUTPUT/a/b.npy` (a single input file to `OUTPUT/<name>.npy`, or to
OUTPUT itself when it ends in .npy), as float32:
- by default a clip embedding [D]: the time mean of the frame embeddings (get_scene_embeddings);
- with --frames the frame embeddings [T, D], one per 160 ms (RuntimeM2D.encode).

Normalisation of the log-mel spectrograms, as `m2d eval` (docs/command-line.md): by default
(--dataset_norm) the mean and std over all the input files, computed first in a pass that reads every
file once, as the published evaluation normalises a task's data; the summary prints them, so a later
run on more files can reuse them with --norm_stats. Weights that store fixed statistics (later
formats) use those instead, and --norm_stats "[MEAN, STD]" the given ones. --no_dataset_norm
normalises each clip with its own mean and std (the first-release runtime's way): then a file's
embedding equals `runtime.get_scene_embeddings(audio[None])` and never depends on the other files.
An embedding never depends on the batch size.

Files that cannot be read, are empty or truncated, longer than --max_seconds (by their header, so
nothing is decoded), shorter than one patch (150 ms), or digital silence (under --no_dataset_norm),
and outputs that cannot be written, are listed at the end; the others are still encoded. Existing
outputs are skipped unless --overwrite, so a run stopped by Ctrl-C continues where it stopped when
run again. A missing or unusable weight file, an output folder that cannot be written, or a disk that
fills up or turns read-only stops it with one line (exit status 2).
"""
import argparse
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F
from tqdm import tqdm

from m2d.audio.io import (
    AUDIO_SUFFIXES,
    MAX_SECONDS,
    add_max_seconds_argument,
    check_max_seconds,
    find_audio_files,
    load_audio,
)
from m2d.audio.lms import RunningMeanStd
from m2d.checkpoint import check_norm_stats
from m2d.cli.common import (
    add_device_argument,
    add_model_arguments,
    add_normalisation_arguments,
    describe_interrupt,
)
from m2d.device import resolve_device
from m2d.errors import AudioReadError, Interrupted, M2DError, OutputError, UsageError, write_error_reason
from m2d.outputs import DISK_WIDE_ERRORS, check_writable
from m2d.runtime.runtime import RuntimeM2D
from util.atomic import remove_stale_temp_files, save_npy_atomic


@dataclass
class EncodeReport:
    """What encode_files did: outputs written, outputs that existed already, and failures with reasons."""
    encoded: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)
    norm_stats: Optional[tuple[float, float]] = None

    @property
    def ok(self) -> bool:
        """True when at least one input has its embedding file (written now or before)."""
        return bool(self.encoded or self.skipped)

    def summary(self) -> str:
        lines = [f'encoded {len(self.encoded)}, skipped {len(self.skipped)} (output exists; --overwrite to redo), '
                 f'failed {len(self.failed)}']
        if self.norm_stats is not None:
            mean, std = self.norm_stats
            lines.append(f'dataset normalisation stats: --norm_stats "[{mean:.6g}, {std:.6g}]"')
        lines += [f'  FAILED {path}: {reason}' for path, reason in self.failed]
        return '\n'.join(lines)


def plan_outputs(input_path: Path, output_path: Path) -> list[tuple[Path, Path]]:
    """(audio file, .npy output) pairs: a folder is searched recursively and mirrored under output_path."""
    if input_path.is_file():
        out = output_path if output_path.suffix == '.npy' else output_path / (input_path.stem + '.npy')
        return [(input_path, out)]
    if not input_path.is_dir():
        raise UsageError(f'input not found: {input_path}')
    return [(src, output_path / src.relative_to(input_path).with_suffix('.npy'))
            for src in find_audio_files(input_path)]


def _duration(path: Path) -> float:
    try:
        return sf.info(str(path)).duration
    except Exception:  # unreadable: load_audio reports why, later
        return 0.0


class _Encoder:
    """Loads, checks and normalises clips, and encodes batches of them exactly as one clip at a time."""

    def __init__(self, runtime: RuntimeM2D, norm_stats: Optional[tuple[float, float]], max_seconds: float):
        self.runtime, self.norm_stats, self.max_seconds = runtime, norm_stats, max_seconds

    def lms(self, path: Path) -> torch.Tensor:
        """One file -> its unnormalised LMS [1, 1, F, T]; raises ValueError/AudioReadError on bad audio."""
        wav = load_audio(path, self.runtime.sample_rate, self.max_seconds)
        return self.runtime.to_feature(torch.from_numpy(wav)[None])

    def normalise(self, lms: torch.Tensor) -> torch.Tensor:
        if self.norm_stats is None:
            try:
                return self.runtime.normalize_batch(lms)
            except ValueError:
                raise ValueError('digital silence: per-clip normalisation is undefined; '
                                 'leave out --no_dataset_norm, or give --norm_stats MEAN STD') from None
        mean, std = self.norm_stats
        return (lms - mean) / std

    def encode(self, batch: list[torch.Tensor]) -> list[torch.Tensor]:
        """Normalised LMS [1, 1, F, T_i] each -> frame embeddings [ceil(T_i / pt), D] each.

        Zero-padding to the longest clip is what encode_lms pads with anyway (last_chunk 'pad'), and
        padded frames are cut off again, so each result equals encoding that clip alone. With 'trim'
        a clip's last chunk is encoded at its own length, so only clips of one length share a pass.
        """
        trim, pt = self.runtime.cfg.last_chunk == 'trim', self.runtime.cfg.patch_size[1]
        groups: dict[int, list[int]] = {}
        for i, x in enumerate(batch):
            groups.setdefault(x.shape[-1] if trim else 0, []).append(i)
        out = [None] * len(batch)
        for members in groups.values():
            longest = max(batch[i].shape[-1] for i in members)
            frames = self.runtime.encode_lms(torch.cat([F.pad(batch[i], (0, longest - batch[i].shape[-1]))
                                                        for i in members]))
            for row, i in enumerate(members):
                out[i] = frames[row, :math.ceil(batch[i].shape[-1] / pt)]
        return out


def dataset_norm_stats(encoder: _Encoder, files: list[Path], report: EncodeReport,
                       progress: bool = True) -> Optional[tuple[float, float]]:
    """Mean and std over every LMS value of every readable file (as EVAR's precompute does); the others go
    to report.failed. None when no file is readable."""
    stats = RunningMeanStd()
    for path in tqdm(files, desc='norm stats', unit='file', disable=not progress):
        try:
            stats.add(encoder.lms(path))
        except (AudioReadError, ValueError) as e:
            report.failed.append((path, str(e).removeprefix(f'{path}: ')))
    return (stats.mean, stats.std) if stats.count else None


def encode_files(weight_file: Union[str, Path], input_path: Union[str, Path], output_path: Union[str, Path],
                 frames: bool = False, norm_stats: Optional[tuple[float, float]] = None, dataset_norm: bool = True,
                 device: Optional[str] = 'auto', batch_size: int = 16, overwrite: bool = False,
                 progress: bool = True, max_seconds: float = MAX_SECONDS, **settings: Any) -> EncodeReport:
    """Encode an audio file or a folder of them into .npy embeddings (see the module docstring).

    Normalisation: `norm_stats` (mean, std) when given, else the statistics the weights store (later
    formats), else with dataset_norm those of all the input files (report.norm_stats), else each clip's own.
    device: 'auto' (cuda if available, else cpu), 'cpu', 'cuda', ... settings: RuntimeM2D settings, e.g.
    model, input_size, patch_size for a folder not named like the published ones. Files longer than
    `max_seconds` (by their header) fail without being read, as does an output that cannot be written.
    Returns an EncodeReport. Raises ValueError (UsageError) for bad arguments, an unusable weight file, an
    output folder that cannot be written, or a disk that fills up or turns read-only (OutputError, saying
    how many files were encoded), FileNotFoundError for a missing input, and Interrupted on Ctrl-C (saying
    how many files were encoded).
    """
    if norm_stats is not None:
        norm_stats = check_norm_stats(norm_stats, 'norm_stats', UsageError)
    if batch_size < 1:
        raise UsageError(f'batch_size must be at least 1, got {batch_size}')
    check_max_seconds(max_seconds)
    input_path, output_path = Path(input_path), Path(output_path)
    jobs = plan_outputs(input_path, output_path)
    single_file = input_path.is_file() and output_path.suffix == '.npy'
    check_writable(output_path, folder=not single_file)  # before loading the model, not after
    if single_file:
        remove_stale_temp_files(output_path.parent)
    elif output_path.is_dir():
        remove_stale_temp_files(output_path, recursive=True)
    report = EncodeReport()
    owner: dict[Path, Path] = {}
    todo = []
    for src, dst in jobs:
        if dst in owner:
            report.failed.append((src, f'same output file {dst} as {owner[dst]}; rename one of them'))
        elif dst.exists() and not overwrite:
            owner[dst] = src
            report.skipped.append(dst)
        else:
            owner[dst] = src
            todo.append((src, dst))
    if not todo:
        return report

    device = resolve_device(device)
    try:
        runtime = RuntimeM2D(weight_file=str(weight_file), **settings)
    except M2DError as e:  # the checkpoint errors name the file; others get it added
        raise UsageError(str(e) if str(weight_file) in str(e) else f'cannot use the weight file {weight_file}: {e}') \
            from None
    runtime = runtime.to(device).eval()
    encoder = _Encoder(runtime, norm_stats, max_seconds)
    try:
        if dataset_norm and encoder.norm_stats is None and runtime.norm_stats is None:
            encoder.norm_stats = report.norm_stats = dataset_norm_stats(encoder, [s for s, _ in jobs], report, progress)
            if encoder.norm_stats is None:  # no file is readable: each one is in report.failed
                return report
        already_failed = {path for path, _ in report.failed}
        todo = sorted((job for job in todo if job[0] not in already_failed), key=lambda job: _duration(job[0]))
        _encode_all(encoder, todo, frames, batch_size, report, progress)
    except KeyboardInterrupt:
        raise Interrupted(describe_interrupt(len(report.encoded), len(todo), 'encoded')) from None
    return report


def _encode_all(encoder: _Encoder, todo: list[tuple[Path, Path]], frames: bool, batch_size: int,
                report: EncodeReport, progress: bool) -> None:
    with tqdm(total=len(todo), desc='encode', unit='file', disable=not progress) as bar:
        for start in range(0, len(todo), batch_size):  # neighbours in duration order: little padding
            batch, jobs = [], []
            for src, dst in todo[start:start + batch_size]:
                try:
                    batch.append(encoder.normalise(encoder.lms(src)))
                    jobs.append((src, dst))
                except (AudioReadError, ValueError, TypeError) as e:
                    report.failed.append((src, str(e).removeprefix(f'{src}: ')))
            for (src, dst), emb in zip(jobs, encoder.encode(batch) if batch else []):
                try:
                    save_npy_atomic((emb if frames else emb.mean(dim=0)).cpu().numpy().astype(np.float32), dst)
                except OSError as e:
                    if e.errno in DISK_WIDE_ERRORS:  # every later file would fail the same way
                        raise OutputError(dst, e, describe_interrupt(len(report.encoded), len(todo), 'encoded')) \
                            from None
                    report.failed.append((src, f'cannot write {dst}: {write_error_reason(e)}'))
                else:
                    report.encoded.append(dst)
            bar.update(len(todo[start:start + batch_size]))


# ----- command line -------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('weight_file', metavar='WEIGHT_FILE',
                        help='checkpoint, e.g. m2d_vit_base-80x608p16x16-220930-mr7/checkpoint-300.pth')
    parser.add_argument('input', metavar='INPUT',
                        help=f'an audio file, or a folder searched recursively for {"/".join(AUDIO_SUFFIXES)}')
    parser.add_argument('output', metavar='OUTPUT', help='output folder (or a .npy file for a single input file)')
    parser.add_argument('--frames', action='store_true', help='save frame embeddings [T, D] instead of clip ones [D]')
    add_normalisation_arguments(parser, data='all the input files (a first pass reads each once)', alone='each clip')
    add_device_argument(parser)
    parser.add_argument('--batch_size', type=int, default=16, help='clips per batch (grouped by similar length)')
    parser.add_argument('--overwrite', action='store_true', help='re-encode files whose output exists')
    add_max_seconds_argument(parser)
    add_model_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """The `encode` command: prints a summary and returns 1 when no input has an embedding file."""
    report = encode_files(args.weight_file, args.input, args.output, frames=args.frames, norm_stats=args.norm_stats,
                          dataset_norm=args.dataset_norm, device=args.device, batch_size=args.batch_size,
                          overwrite=args.overwrite, max_seconds=args.max_seconds, model=args.model,
                          input_size=args.input_size, patch_size=args.patch_size,
                          trust_checkpoint=args.trust_checkpoint)
    if not (report.encoded or report.skipped or report.failed):
        print(f'no {"/".join(AUDIO_SUFFIXES)} files found in {args.input}')
        return 1
    print(report.summary())
    return 0 if report.ok else 1
