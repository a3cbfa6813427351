"""Downstream tasks in EVAR's format: where they live, how long a clip is, and their labels and splits.

A task is a metadata CSV with `file_name` (relative to the task's audio folder), `label`
(comma-separated for multi-label tasks) and either `split` (train/valid/test) or `fold` (1..K, each
fold held out in turn as test). EVAR keeps them as `evar/metadata/<task>.csv` with 16 kHz audio in
`work/16k/<task>/`; setting --evar_root (or M2D_EVAL_DATA) to an EVAR checkout finds them there. A task
given by its CSV has its audio below --data_path (the CSV's folder/audio, or the folder, by default).
"""
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
import pandas as pd
import soundfile as sf

from m2d.errors import TaskError
from m2d.eval import EARLIER_KEYWORDS, renamed_keywords
from m2d.filelist import check_relative, read_table

DEMO_DIR_ENV = 'M2D_EVAL_DEMO'
# Below the folder a command runs in (as ./results), made on first use; $M2D_EVAL_DEMO moves it.
DEMO_DIR = Path(os.environ.get(DEMO_DIR_ENV) or Path('data') / 'demo_task')
DATA_ROOT_ENV = 'M2D_EVAL_DATA'
SPLITS = ('train', 'valid', 'test')

# EVAR's task definitions: (folds, seconds per clip); folds 1 = fixed train/valid/test split.
EVAR_TASKS = {
    'esc50': (5, 5.0), 'us8k': (10, 4.0), 'spcv1': (1, 1.0), 'spcv2': (1, 1.0), 'vc1': (1, 8.2),
    'voxforge': (1, 5.8), 'cremad': (1, 2.5), 'gtzan': (1, 30.0), 'nsynth': (1, 4.0), 'surge': (1, 4.0),
    'fsd50k': (1, 7.6358), 'fsdnoisy18k': (1, 8.25),
}
DEMO_SECONDS = 2.0


@dataclass(frozen=True)
class TaskSpec:
    """Where a task's metadata and audio are, and the clip length every file is cropped/padded to."""
    name: str
    metadata: Path
    audio_root: Path
    seconds: float


def evar_data_root(root: Optional[Union[str, Path]] = None) -> Optional[Path]:
    """The EVAR data root: `root`, else $M2D_EVAL_DATA, else None."""
    root = root or os.environ.get(DATA_ROOT_ENV)
    return Path(root).expanduser() if root else None


def evar_spec(name: str, root: Optional[Union[str, Path]] = None) -> TaskSpec:
    """EVAR's layout below the data root: evar/metadata/<task>.csv and work/16k/<task>/."""
    base = evar_data_root(root)
    if base is None:
        raise TaskError(f'task {name!r} is an EVAR task: set {DATA_ROOT_ENV} (or --evar_root) to the EVAR folder '
                        f'holding evar/metadata/{name}.csv and work/16k/{name}/')
    return TaskSpec(name, base / 'evar' / 'metadata' / f'{name}.csv', base / 'work' / '16k' / name, EVAR_TASKS[name][1])


def demo_spec(root: Union[str, Path] = DEMO_DIR) -> TaskSpec:
    """The built-in demo task (m2d.audio.synth.write_labelled_task), generated on first use."""
    root = Path(root)
    if not (root / 'metadata.csv').exists():
        from m2d.audio.synth import write_labelled_task
        print(f'Generating the demo task in {root} (once)', flush=True)
        root.parent.mkdir(parents=True, exist_ok=True)
        # Written aside and renamed into place, so concurrent evaluations never read a half-written task.
        tmp = Path(tempfile.mkdtemp(prefix=f'.{root.name}.', dir=root.parent))
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the task folder is an ordinary one
        try:
            write_labelled_task(tmp)
            try:
                os.rename(tmp, root)
            except OSError:  # another process got there first, or a stale folder is in the way
                pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if not (root / 'metadata.csv').exists():
            raise TaskError(f'{root} exists without metadata.csv; delete the folder to regenerate the demo task')
    return TaskSpec('demo', root / 'metadata.csv', root / 'audio', DEMO_SECONDS)


def csv_spec(path: Union[str, Path], data_path: Optional[Union[str, Path]] = None,
             clip_seconds: Optional[float] = None) -> TaskSpec:
    """A task given by its metadata CSV, named after the file (or its folder, for metadata.csv).
    data_path (the folder its file names start from) defaults to the CSV's folder/audio (or the folder itself);
    the clip length to the longest listed file."""
    path = Path(path)
    if data_path is None:
        data_path = path.parent / 'audio' if (path.parent / 'audio').is_dir() else path.parent
    name = path.parent.name if path.stem == 'metadata' else path.stem  # dst/metadata.csv (demo layout) -> dst
    spec = TaskSpec(name, path, Path(data_path), clip_seconds or 0.0)
    if not clip_seconds:
        files = [spec.audio_root / f for f in read_metadata(spec).file_name]
        check_files(spec, files)
        spec = TaskSpec(spec.name, spec.metadata, spec.audio_root, max(sf.info(str(f)).duration for f in files))
    return spec


@renamed_keywords(**EARLIER_KEYWORDS)
def resolve_task(task: str, evar_root: Optional[Union[str, Path]] = None, data_path: Optional[str] = None,
                 clip_seconds: Optional[float] = None) -> TaskSpec:
    """A task name ('demo' or an EVAR task, found below `evar_root`) or a metadata CSV path -> TaskSpec.
    data_path: the audio folder its file names start from; clip_seconds: the clip length (default: the task's)."""
    if task == 'demo':
        return demo_spec()
    if task in EVAR_TASKS:
        spec = evar_spec(task, evar_root)
        return TaskSpec(spec.name, spec.metadata, Path(data_path or spec.audio_root), clip_seconds or spec.seconds)
    if task.endswith('.csv') or Path(task).is_file():
        if not Path(task).is_file():
            raise TaskError(f'metadata file not found: {task}')
        return csv_spec(task, data_path, clip_seconds)
    raise TaskError(f'unknown task {task!r}; known tasks: demo, {", ".join(EVAR_TASKS)}, '
                    'or a path to an EVAR-format metadata CSV (file_name, label, split|fold)')


def task_available(spec: TaskSpec) -> bool:
    """Whether the metadata and the audio folder exist (files are checked when the task is loaded)."""
    return spec.metadata.is_file() and spec.audio_root.is_dir()


def _rows(df: pd.DataFrame, rows: list[int]) -> str:
    """'line 3 (a.wav), line 7 (b.wav), ...' for row indices of a metadata table (line 1: the header)."""
    return ', '.join(f'line {i + 2} ({df.file_name[i]})' for i in rows[:5]) + (', ...' if len(rows) > 5 else '')


def read_metadata(spec: TaskSpec) -> pd.DataFrame:
    """The task's metadata table, checked: columns, rows, and file names that stay inside the audio folder."""
    if not spec.metadata.is_file():
        raise TaskError(f'task {spec.name!r}: metadata file not found: {spec.metadata}')
    try:
        df = read_table(spec.metadata, 'metadata file', dtype={'label': str})
    except ValueError as e:
        raise TaskError(f'task {spec.name!r}: {e}') from None
    missing = [c for c in ('file_name', 'label') if c not in df.columns]
    if missing or not ({'split', 'fold'} & set(df.columns)):
        raise TaskError(f'{spec.metadata}: needs columns file_name, label and split (train/valid/test) or fold; '
                        f'found {list(df.columns)}')
    if df.empty:
        raise TaskError(f'{spec.metadata} lists no files')
    unnamed = np.flatnonzero(df.file_name.isna()).tolist()
    if unnamed:
        raise TaskError(f'task {spec.name!r}: {len(unnamed)} rows of {spec.metadata} have no file_name: '
                        f'{_rows(df, unnamed)}')
    try:
        check_relative(df.file_name.astype(str).tolist(), list(range(2, len(df) + 2)), spec.metadata, '--data_path')
    except ValueError as e:
        raise TaskError(f'task {spec.name!r}: {e}') from None
    return df


def check_files(spec: TaskSpec, files: list[Path]) -> None:
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise TaskError(f'task {spec.name!r}: {len(missing)} of {len(files)} listed audio files are missing below '
                        f'{spec.audio_root}:\n  ' + '\n  '.join(missing[:10])
                        + ('\n  ...' if len(missing) > 10 else ''))


@dataclass
class TaskData:
    """A loaded, validated task. y: class indices [N] (single-label) or multi-hot [N, C] (multi-label)."""
    spec: TaskSpec
    files: list[Path]
    y: np.ndarray
    classes: list[str]
    multi_label: bool
    split: Optional[np.ndarray]  # [N] 'train'/'valid'/'test', or None for fold tasks
    fold: Optional[np.ndarray]   # [N] fold numbers, or None

    @property
    def n_folds(self) -> int:
        return 1 if self.fold is None else len(np.unique(self.fold))

    def indices(self, fold: int = 0, valid_ratio: float = 0.1, seed: int = 0) -> dict[str, np.ndarray]:
        """{'train', 'valid', 'test'} -> row indices. Fold tasks hold out fold number `fold` (1..K) as test
        and a seeded random `valid_ratio` of the rest as valid (EVAR's fold metadata has no valid part)."""
        if self.fold is None:
            return {s: np.flatnonzero(self.split == s) for s in SPLITS}
        folds = np.unique(self.fold)
        if not 1 <= fold <= len(folds):
            n = len(folds)
            raise TaskError(f'no fold {fold} in task {self.spec.name!r}: its {n} folds are numbered 1 to {n}')
        rest = np.flatnonzero(self.fold != folds[fold - 1])
        rest = np.random.default_rng(seed).permutation(rest)
        n_valid = max(1, int(round(len(rest) * valid_ratio)))
        return {'train': np.sort(rest[n_valid:]), 'valid': np.sort(rest[:n_valid]),
                'test': np.flatnonzero(self.fold == folds[fold - 1])}


def _check_labels(spec: TaskSpec, labels: list[list[str]], groups: np.ndarray, what: str) -> None:
    """Every label of a held-out group must occur in the other groups (training data)."""
    for g in np.unique(groups):
        if what == 'split' and g == 'train':
            continue
        seen = {label for ls, gg in zip(labels, groups) if (gg == 'train' if what == 'split' else gg != g)
                for label in ls}
        unseen = sorted({label for ls, gg in zip(labels, groups) if gg == g for label in ls} - seen)
        if unseen:
            raise TaskError(f'task {spec.name!r}: {what} {g} has labels that no training sample has: '
                            f'{unseen[:10]}; a classifier cannot learn them. Fix the metadata split.')


def load_task(spec: TaskSpec, check_audio: bool = True) -> TaskData:
    """Read and validate a task: columns, splits/folds with samples, at least two classes, no test label
    absent from training, and (check_audio) every listed file present."""
    df = read_metadata(spec)
    labels = [[] if pd.isna(v) else [label.strip() for label in v.split(',') if label.strip()] for v in df.label]
    unlabelled = [i for i, ls in enumerate(labels) if not ls or any(label.lower() == 'nan' for label in ls)]
    if unlabelled:  # never a class called 'nan'
        raise TaskError(f'task {spec.name!r}: {len(unlabelled)} rows of {spec.metadata} have an empty or NaN label: '
                        f'{_rows(df, unlabelled)}; give every row a label, or remove the row')
    multi_label = any(len(ls) > 1 for ls in labels)
    classes = sorted({label for ls in labels for label in ls})
    if len(classes) < 2:
        raise TaskError(f'task {spec.name!r}: only one class ({classes}); a classifier needs at least two')
    column = 'split' if 'split' in df.columns else 'fold'
    unassigned = np.flatnonzero(df[column].isna()).tolist()
    if unassigned:  # an empty fold would be a fold of its own (NaN), an empty split an unknown one
        raise TaskError(f'task {spec.name!r}: {len(unassigned)} rows of {spec.metadata} have an empty {column}: '
                        f'{_rows(df, unassigned)}; give every row a '
                        + ('split (train, valid or test)' if column == 'split' else 'fold number'))
    split = fold = None
    if 'split' in df.columns:
        split = df.split.astype(str).str.strip().str.lower().replace({'val': 'valid', 'validation': 'valid'}).values
        unknown = sorted(set(split) - set(SPLITS))
        if unknown:
            raise TaskError(f'task {spec.name!r}: unknown split values {unknown}; use train, valid and test')
        empty = [s for s in SPLITS if not (split == s).any()]
        if empty:
            raise TaskError(f'task {spec.name!r}: split {", ".join(empty)} has no samples; '
                            'the metadata needs train, valid and test rows')
        _check_labels(spec, labels, split, 'split')
    else:
        fold = df.fold.values
        if len(np.unique(fold)) < 2:
            raise TaskError(f'task {spec.name!r}: fold column has a single fold ({np.unique(fold)}); '
                            'cross-validation needs at least two')
        _check_labels(spec, labels, fold, 'fold')
    files = [spec.audio_root / f for f in df.file_name]
    if check_audio:
        check_files(spec, files)
    index = {c: i for i, c in enumerate(classes)}
    if multi_label:
        y = np.zeros((len(labels), len(classes)), dtype=np.float32)
        for row, ls in enumerate(labels):
            y[row, [index[label] for label in ls]] = 1.0
    else:
        y = np.array([index[ls[0]] for ls in labels], dtype=np.int64)
    return TaskData(spec, files, y, classes, multi_label, split, fold)
