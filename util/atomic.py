"""Atomic file writes: a crash mid-write leaves the previous file (or none), never a truncated one."""
import contextlib
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator, Union

import numpy as np
import torch


@contextlib.contextmanager
def open_atomic(path: Union[str, Path], mode: str = 'wb') -> Iterator[IO]:
    """Open a temporary file beside `path` for writing; on success fsync it and rename it over `path`.

    A crash or exception mid-write leaves the previous file (or none), never a truncated one. The new
    file gets the usual permissions (0666 minus the umask), like a plain open() would give it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=path.parent)
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


def save_atomic(obj: Any, path: Union[str, Path]) -> Path:
    """torch.save `obj` to `path` atomically (see open_atomic)."""
    with open_atomic(path) as f:
        torch.save(obj, f)
    return Path(path)


def save_npy_atomic(array: np.ndarray, path: Union[str, Path]) -> Path:
    """np.save `array` to `path` (exactly that name, no '.npy' appended) atomically (see open_atomic)."""
    with open_atomic(path) as f:
        np.save(f, array)
    return Path(path)

