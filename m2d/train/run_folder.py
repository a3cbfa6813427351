"""A run folder belongs to one run: who may write into it, and the lock a run holds while it trains.

- A new run (no --resume) starts only in a folder that holds no checkpoints; `--overwrite` moves an
  earlier run's files aside into `previous-<date>-<time>/` first (nothing is deleted).
- A resumed run continues in the folder of its own checkpoints; it refuses to overwrite later
  checkpoints than the one it resumes from (again unless --overwrite moves them aside).
- While a run trains it holds an exclusive lock on `<folder>/.lock` (fcntl.flock, which the kernel
  releases when the process dies, however it dies). A second run into the folder is refused; a lock
  file left by a killed run is free and is taken over.
"""
import contextlib
import datetime
import json
import os
import re
import shutil
import socket
from pathlib import Path
from typing import Callable, Iterator, Optional

from m2d.errors import RunFolderError
from m2d.outputs import writing
from util.atomic import open_atomic

try:
    import fcntl
except ImportError:  # not on Windows: runs there are not locked
    fcntl = None

LOCK_NAME = '.lock'
ASIDE_PREFIX = 'previous-'
_CHECKPOINT = re.compile(r'^checkpoint-(\d+)\.pth$')
STEP_CHECKPOINT = 'checkpoint-last.pth'  # --save_every_steps: the latest step checkpoint, newer than any epoch's


def checkpoint_epochs(folder: Path) -> dict[int, Path]:
    """{epoch: path} of the checkpoint-N.pth files directly in `folder`."""
    if not folder.is_dir():
        return {}
    found = (_CHECKPOINT.match(p.name) for p in folder.iterdir())
    return {int(m[1]): folder / m[0] for m in found if m}


def _read_owner(lock_path: Path) -> dict:
    try:
        return json.loads(lock_path.read_text() or '{}')
    except (OSError, ValueError):
        return {}


def _owner_text(owner: dict) -> str:
    return f"pid {owner.get('pid', '?')} on {owner.get('host', '?')}, started {owner.get('started', '?')}"


def check_ownership(folder: Path, resume: Optional[Path], overwrite: bool) -> list[Path]:
    """Whether this run may write into `folder`; -> the files --overwrite must move aside first.

    resume: the checkpoint a resumed run continues from (None for a new run). Raises RunFolderError
    with what to do instead.
    """
    checkpoints = sorted(checkpoint_epochs(folder).items())
    step = folder / STEP_CHECKPOINT
    if step.is_file():  # removed whenever an epoch checkpoint is saved: always the latest
        checkpoints.append((float('inf'), step))
    if not checkpoints:
        return []
    shown = ', '.join(p.name for _, p in checkpoints[-3:])
    latest = checkpoints[-1][1]
    if resume is None:
        if overwrite:
            return [p for p in folder.iterdir() if p.name != LOCK_NAME and not p.name.startswith(ASIDE_PREFIX)]
        raise RunFolderError(f'{folder} already holds checkpoints of another run ({shown}); continue that run with '
                             f'--resume {latest}, choose another --output_dir, or pass --overwrite to start over '
                             f'(its files are moved into {folder / (ASIDE_PREFIX + "...")})')
    if resume.resolve().parent != folder.resolve():
        raise RunFolderError(f'{folder} holds checkpoints of another run ({shown}), not of {resume}; resume into an '
                             f'empty --output_dir (or the folder of {resume.name})')
    match = _CHECKPOINT.match(resume.name)
    later = [p for epoch, p in checkpoints if match and epoch > int(match[1])]
    if later and not overwrite:
        names = ', '.join(p.name for p in later)
        raise RunFolderError(f'{folder} holds later checkpoints than {resume.name} ({names}) '
                             f'that resuming would overwrite; resume from {latest.name}, or pass --overwrite to move '
                             f'the later ones aside')
    return later


def move_aside(folder: Path, files: list[Path]) -> Optional[Path]:
    """Move `files` into a new `folder/previous-YYYYmmdd-HHMMSS/`; -> that folder (None if no files)."""
    if not files:
        return None
    stamp = f'{ASIDE_PREFIX}{datetime.datetime.now():%Y%m%d-%H%M%S}'
    aside, n = folder / stamp, 1
    while aside.exists():
        n += 1
        aside = folder / f'{stamp}-{n}'
    aside.mkdir()
    for path in files:
        shutil.move(str(path), str(aside / path.name))
    return aside


@contextlib.contextmanager
def run_lock(folder: Path, print_fn: Callable[[str], None] = print) -> Iterator[None]:
    """Hold an exclusive lock on `folder` while the block runs; RunFolderError if another live process
    holds it. A lock file whose process is gone (killed) is taken over, with a note."""
    if fcntl is None:
        yield
        return
    path = folder / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunFolderError(_in_use_message(folder, _read_owner(path))) from None
        except OSError as e:  # a file system without locks (some network mounts): train unlocked, and say so
            print_fn(f'Note: cannot lock {path} ({e.strerror}); make sure no other run writes into {folder}')
            yield
            return
        stale = _read_owner(path)
        if stale:
            print_fn(f'Note: took over the lock of a run that ended without releasing it ({_owner_text(stale)})')
        owner = dict(pid=os.getpid(), host=socket.gethostname(), started=f'{datetime.datetime.now():%Y-%m-%d %H:%M:%S}')
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(owner).encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # released cleanly: an empty lock file is no stale lock
    finally:
        os.close(fd)  # closing releases the flock


def in_use(folder: Path) -> Optional[str]:
    """None if no live process holds `folder`'s lock, else the error that names it (a quick look before
    a run claims the folder; run_lock decides)."""
    path = folder / LOCK_NAME
    if fcntl is None or not path.is_file():
        return None
    with open(path) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return _in_use_message(folder, _read_owner(path))
        except OSError:
            return None
        fcntl.flock(f, fcntl.LOCK_UN)
    return None


def _in_use_message(folder: Path, owner: dict) -> str:
    return (f'{folder} is in use by another run ({_owner_text(owner)}); wait for it to finish, or choose another '
            '--output_dir')


def unused_folder(name: str) -> Path:
    """`name`, or `name-2`, `name-3`, ... if an earlier run saved checkpoints there or a run is using it."""
    path, n = Path(name), 1
    while checkpoint_epochs(path) or in_use(path):
        n += 1
        path = Path(f'{name}-{n}')
    return path

def truncate_log(path: Path, epochs_done: int) -> None:
    """Keep the lines of log.txt up to epoch `epochs_done`, atomically: a run killed after logging epochs
    it never saved must not list them twice once it is resumed from its last checkpoint."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)

    def keep(line: str) -> bool:
        try:
            return json.loads(line)['epoch'] <= epochs_done
        except (ValueError, KeyError, TypeError):  # e.g. a line cut short by the kill
            return False

    kept = [line for line in lines if keep(line)]
    if kept != lines:
        with writing(path), open_atomic(path, 'w') as f:
            f.writelines(kept)
