"""The errors m2d reports to a user. Each is an M2DError, which the command lines turn into one line on
stderr (no traceback) and an exit status; each also keeps the built-in type it refines, so library
callers can catch ValueError or RuntimeError as before.
"""
import errno
from pathlib import Path
from typing import Union

_WRITE_REASONS = {errno.ENOSPC: 'no space left on device', errno.EDQUOT: 'disk quota exceeded',
                  errno.EROFS: 'not writable (read-only file system)',
                  errno.EACCES: 'not writable (permission denied)',
                  errno.EPERM: 'not writable (operation not permitted)',
                  errno.ENOTDIR: 'a file is in the way, not a folder',
                  errno.EEXIST: 'a file is in the way, not a folder'}  # from making the folders of a path


class M2DError(Exception):
    """Base of every error m2d reports as one line; exit_status is what a command line exits with."""
    exit_status = 2


class UsageError(M2DError, ValueError):
    """Bad arguments or data: what was wrong and what to do."""


def write_error_reason(error: OSError) -> str:
    """Why a write failed, in a few words: 'no space left on device', 'file name too long', ..."""
    return _WRITE_REASONS.get(error.errno) or (error.strerror or str(error)).lower()


class OutputError(UsageError):
    """An output could not be written (disk full, read-only, ...): 'cannot write PATH: REASON[; NOTE]'."""

    def __init__(self, path: Union[str, Path], reason: Union[str, OSError], note: str = ''):
        if isinstance(reason, OSError):
            reason = write_error_reason(reason)
        super().__init__(f'cannot write {path}: {reason}' + (f'; {note}' if note else ''))
        self.path = Path(path)


class CheckpointError(M2DError, ValueError):
    """A weight file that cannot be read, or that does not hold a model that can be built and loaded."""


class UnsafeCheckpointError(CheckpointError):
    """A weight file whose loading would unpickle Python objects beyond tensors and containers (run code)."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No weight file at the given path."""


class AudioReadError(M2DError, RuntimeError):
    """An audio file could not be read, holds no samples, or holds NaN/inf samples."""


class TaskError(M2DError, ValueError):
    """An evaluation task cannot be evaluated as given (unknown, missing files, unusable labels or splits)."""


class RunFolderError(UsageError):
    """A run folder belongs to another run, or is in use."""


class NonFiniteLossError(M2DError, RuntimeError):
    """The training loss became NaN or inf; training cannot go on."""
    exit_status = 1


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, carrying a line that says what was done and how to continue (still a KeyboardInterrupt)."""


class ShardError(UsageError):
    """A shard (m2d pack) that is missing, truncated, corrupt or of another LMS shape: one line naming it.

    Raised in a DataLoader worker, it reaches the training process as this type with the worker's
    traceback as its text (torch's re-raise): only the last line, the original message, is kept."""

    def __init__(self, message: str):
        last = message.strip().splitlines()[-1] if message.strip() else message
        super().__init__(last.split('ShardError: ', 1)[-1])
