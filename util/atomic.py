"""Atomic file writes: a crash mid-write leaves the previous file (or none), never a truncated one."""
import contextlib
import os
import sys
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator, Union

import numpy as np
import torch

# The first this many bytes of the target's name start its temporary name, which then stays under 130
# bytes: legal beside any legal name (file systems allow 255 bytes, eCryptfs 143).
TEMP_NAME_BYTES = 100


@contextlib.contextmanager
def open_atomic(path: Union[str, Path], mode: str = 'wb') -> Iterator[IO]:
    """Open a temporary file beside `path` for writing; on success fsync it and rename it over `path`.

    A crash or exception mid-write leaves the previous file (or none), never a truncated one. The new
    file gets the usual permissions (0666 minus the umask), like a plain open() would give it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # .NAME.PID.XXXXXXXX.tmp: the writer's process id tells remove_stale_temp_files what a hard kill left.
    name = os.fsencode(path.name)[:TEMP_NAME_BYTES].decode(sys.getfilesystemencoding(), 'ignore')  # whole characters
    fd, tmp = tempfile.mkstemp(prefix=f'.{name}.{os.getpid()}.', suffix='.tmp', dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp creates 0600 files
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _process_exists(pid: int) -> bool:
    if os.name != 'posix':  # no cheap check elsewhere: treat every writer as alive and keep its file
        return True
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temp_files(folder: Union[str, Path], recursive: bool = False) -> list[Path]:
    """Delete the temporary files open_atomic left in `folder` (and below it, if recursive) when its
    process was killed mid-write: `.NAME.PID.XXXXXXXX.tmp` (NAME: the start of the target's name) whose
    process PID no longer exists on this machine. Files of running writers are left alone. Returns the
    removed paths."""
    folder = Path(folder)
    removed = []
    for path in (folder.rglob if recursive else folder.glob)('.*.tmp'):
        parts = path.name[1:-len('.tmp')].rsplit('.', 2)  # NAME, PID, random part
        if len(parts) == 3 and parts[1].isdigit() and path.is_file() and not _process_exists(int(parts[1])):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def save_atomic(obj: Any, path: Union[str, Path]) -> Path:
    """torch.save `obj` to `path` atomically (see open_atomic). A failed write raises its OSError
    (e.g. ENOSPC), not the RuntimeError torch's zip writer turns it into."""
    with open_atomic(path) as f:
        try:
            torch.save(obj, f)
        except RuntimeError as e:
            cause = e.__cause__ or e.__context__
            if isinstance(cause, OSError):
                raise cause from None
            raise
    return Path(path)


class _WriteOnly:
    """A file that numpy sees only through write(): np.save then writes through Python, whose OSError
    keeps its errno, instead of with C's fwrite (a full disk would read '... requested and ... written')."""

    def __init__(self, f: IO):
        self.write = f.write


def save_npy_atomic(array: np.ndarray, path: Union[str, Path]) -> Path:
    """np.save `array` to `path` (exactly that name, no '.npy' appended) atomically (see open_atomic).
    A failed write raises its OSError (e.g. ENOSPC)."""
    with open_atomic(path) as f:
        np.save(_WriteOnly(f), array)
    return Path(path)

