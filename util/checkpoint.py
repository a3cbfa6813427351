"""Checkpoint I/O: atomic writes and tolerant, safe-first reads."""
import argparse
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Union

import torch


def save_atomic(obj: Any, path: Union[str, Path]) -> Path:
    """torch.save to a temporary file beside `path`, fsync, then rename over `path`.

    A crash mid-write leaves the previous file (or none), never a truncated one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=path.parent)
    try:
        with os.fdopen(fd, 'wb') as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: Union[str, Path]) -> Any:
    """torch.load on CPU. Tries weights-only loading (with argparse.Namespace allowed, as training
    checkpoints store their args) and falls back to full unpickling with a warning."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'weight file not found: {path}')
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as safe_error:
        try:
            obj = torch.load(path, map_location='cpu', weights_only=False)
        except Exception as e:
            raise RuntimeError(f'cannot read checkpoint {path}: {e}') from e
        warnings.warn(f'{path} needed full unpickling ({type(safe_error).__name__}); load only files you trust')
        return obj
