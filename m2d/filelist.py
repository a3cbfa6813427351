"""File lists: the CSV tables and text lists that name audio or LMS files relative to a base folder
(pre-training data sets, wav2lms --files, evaluation tasks), read with one-line errors."""
import os
from pathlib import Path
from typing import Sequence, Union

import pandas as pd

from m2d.errors import UsageError

PathLike = Union[str, Path]


def read_table(path: PathLike, what: str = 'CSV', **read_csv_kwargs) -> pd.DataFrame:
    """pd.read_csv with one-line errors that name the file (missing, empty, not a CSV). Only empty
    fields are missing values (NaN): a name or label such as 'NA' or 'None' stays a string."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f'{what} not found: {path}')
    try:
        return pd.read_csv(path, keep_default_na=False, na_values=[''], **read_csv_kwargs)
    except pd.errors.EmptyDataError:
        raise UsageError(f'{what} {path} is empty; it needs a header line, then one row per file') from None
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise UsageError(f'{what} {path} is not a readable CSV file ({str(e).strip()})') from None


def leaves_folder(name: str) -> bool:
    """Whether a relative path from a file list points outside its base folder: absolute, or climbing
    out with '..'. Compared as written (lexically), so symlinks inside the folder may point anywhere."""
    return os.path.isabs(name) or os.path.normpath(name).split(os.sep)[0] == os.pardir


def check_relative(names: Sequence[str], lines: Sequence[int], listing: PathLike, base_option: str) -> None:
    """Raise ValueError naming the first few `names` (at `lines` of the `listing` file) that leave their
    base folder (see leaves_folder); `base_option` is the option that sets that folder."""
    bad = [(n, line) for n, line in zip(names, lines) if leaves_folder(str(n))]
    if bad:
        shown = ', '.join(f'line {line}: {n}' for n, line in bad[:5]) + (', ...' if len(bad) > 5 else '')
        raise UsageError(f'{listing}: {len(bad)} file names point outside {base_option} (absolute or with ..): '
                         f'{shown}. List paths relative to {base_option}, or set {base_option} to a folder '
                         f'that holds them all')


def read_file_list(path: PathLike, what: str = 'dataset CSV', base_option: str = '--data_path') -> list[str]:
    """The sorted file names of a list: a CSV's `file_name` column, or (for other suffixes, e.g. .txt)
    one name per line. Names are paths relative to the folder `base_option` sets; names that leave it
    are rejected (check_relative)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{what} not found: {path}. It lists paths relative to {base_option}: a CSV with a "
                                "'file_name' column, or a text file with one path per line (see docs/pretraining.md)")
    if path.suffix.lower() == '.csv':
        df = read_table(path, what)
        if 'file_name' not in df.columns:
            raise UsageError(f"{path} has no 'file_name' column (columns: {list(df.columns)}); the first line "
                             f"must be the header 'file_name', then one path per line, relative to {base_option}")
        rows = [(str(f), i + 2) for i, f in enumerate(df['file_name']) if not pd.isna(f)]  # line 1: the header
    else:
        rows = [(line.strip(), n) for n, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    if not rows:
        raise UsageError(f'{path} lists no files')
    check_relative([f for f, _ in rows], [line for _, line in rows], path, base_option)
    return sorted(f for f, _ in rows)
