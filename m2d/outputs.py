"""Outputs: check that a file or folder can be written before work starts, and turn a failed write into
a one-line OutputError that names the file."""
import contextlib
import errno
import tempfile
from pathlib import Path
from typing import Iterator, Union

from m2d.errors import OutputError

# Write errors that every later write to the same disk meets too: a batch job stops at the first one
# instead of failing each remaining file the same way.
DISK_WIDE_ERRORS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})


def check_writable(path: Union[str, Path], folder: bool = False) -> None:
    """Raise OutputError unless `path` (a file, or with folder=True a folder) can be created or written,
    testing the nearest existing folder with a real temporary file (which also works for root)."""
    path = Path(path)
    if path.exists() and path.is_dir() != folder:
        raise OutputError(path, 'it is a folder, not a file' if path.is_dir() else 'it is a file, not a folder')
    existing = path if folder and path.is_dir() else path.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(path, f'{existing} is a file, not a folder')
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise OutputError(path, e) from None


@contextlib.contextmanager
def writing(path: Union[str, Path]) -> Iterator[None]:
    """Turn an OSError raised in the block (disk full, read-only, ...) into an OutputError naming `path`."""
    try:
        yield
    except OSError as e:
        raise OutputError(path, e) from e
