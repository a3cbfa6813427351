"""What every command-line tool shares (`m2d COMMAND`, train_audio.py, wav_to_lms.py, python -m m2d.eval):
one-line errors with exit status 2, a short line and status 130 on Ctrl-C, help that shows each
option's default, one `--norm_stats` syntax, and checks that an output can be written before work starts.

A tool module provides `add_arguments(parser)` and `run(args) -> exit status` (and optionally
`complete_args(args, argv)`); `run_tool` builds its parser and runs it. Its docstring is the tool's description.
"""
import argparse
import contextlib
import errno
import math
import pickle
import sys
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Iterator, Optional, Sequence, Union

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # what a shell reports for a process ended by SIGINT

# What loading a weight file can raise: missing (OSError), not a checkpoint or the wrong model (ValueError
# and subclasses), truncated or corrupt (RuntimeError from torch.load, pickle/EOF errors from old formats).
LOAD_ERRORS = (OSError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError)

_WRITE_REASONS = {errno.ENOSPC: 'no space left on device', errno.EDQUOT: 'disk quota exceeded',
                  errno.EROFS: 'not writable (read-only file system)',
                  errno.EACCES: 'not writable (permission denied)',
                  errno.EPERM: 'not writable (operation not permitted)',
                  errno.ENOTDIR: 'a file is in the way, not a folder',
                  errno.EEXIST: 'a file is in the way, not a folder'}  # from making the folders of a path
# Write errors that every later write to the same disk meets too: a batch job stops at the first one
# instead of failing each remaining file the same way.
DISK_WIDE_ERRORS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})


class UsageError(ValueError):
    """Bad arguments or data: reported as one line (no traceback), exit status 2."""


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


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, carrying a line that says what was done and how to continue (still a KeyboardInterrupt)."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written; an option's help ends with its default unless it names one itself."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ''
        if (not action.option_strings or 'default' in text or action.default in (None, False, '', [])
                or action.default is argparse.SUPPRESS):
            return text
        return f'{text} (default: %(default)s)'

    def _format_args(self, action: argparse.Action, default_metavar: str) -> str:
        if isinstance(action, _NormStatsAction):  # one or two words, shown as the published form
            return action.metavar
        return super()._format_args(action, default_metavar)


def build_parser(module: ModuleType, prog: str) -> argparse.ArgumentParser:
    """The argument parser of a tool module (its docstring as the description)."""
    parser = argparse.ArgumentParser(prog=prog, description=module.__doc__, formatter_class=HelpFormatter)
    module.add_arguments(parser)
    return parser


def run_tool(module: ModuleType, prog: str, argv: Optional[Sequence[str]] = None) -> int:
    """Parse argv (default sys.argv[1:]) with the module's arguments and run it; -> exit status. A module's
    optional `complete_args(args, argv)` fills in values that depend on which flags were given (e.g.
    pre-training's --resume takes the others from the checkpoint)."""
    def parse_and_run() -> int:
        args = build_parser(module, prog).parse_args(argv)
        complete = getattr(module, 'complete_args', None)
        return module.run(complete(args, argv) if complete else args)
    return guarded(parse_and_run)


def guarded(run, *args) -> int:
    """run(*args) -> its exit status, with usage errors and Ctrl-C turned into one line on stderr."""
    try:
        return run(*args) or 0
    except UsageError as e:
        print(f'error: {e}', file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as e:
        print(f'interrupted; {e}' if str(e) else 'interrupted', file=sys.stderr)
        return EXIT_INTERRUPTED


# ----- option values ---------------------------------------------------------------------------------

def parse_numbers(text: str, kind: type = float) -> list:
    """'[-7.1, 4.2]', '-7.1,4.2' or '-7.1 4.2' -> [-7.1, 4.2]; '' -> []."""
    parts = str(text).strip().strip('[]()').replace(',', ' ').split()
    try:
        return [kind(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected a list of numbers like "[-7.1, 4.2]", got {text!r}') from None


def parse_norm_stats(text: str) -> list[float]:
    """'[mean, std]' (also 'mean,std' or 'mean std') -> [mean, std]; both finite, std > 0."""
    try:
        values = parse_numbers(text)
    except argparse.ArgumentTypeError:
        values = []
    if len(values) != 2 or not all(map(math.isfinite, values)) or values[1] <= 0:
        raise argparse.ArgumentTypeError(f'needs two finite numbers "[mean, std]" with std > 0, got {text!r}')
    return values


class _NormStatsAction(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        try:
            setattr(namespace, self.dest, parse_norm_stats(' '.join(values)))
        except argparse.ArgumentTypeError as e:
            raise argparse.ArgumentError(self, str(e)) from None


def add_norm_stats_argument(parser: argparse.ArgumentParser, help: str, **kwargs) -> argparse.Action:
    """--norm_stats "[MEAN, STD]" (one argument, the published form) or --norm_stats MEAN STD."""
    return parser.add_argument('--norm_stats', nargs='+', action=_NormStatsAction, metavar='"[MEAN, STD]"',
                               help=help, **kwargs)


# ----- outputs -------------------------------------------------------------------------------------

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


def describe_interrupt(done: int, total: int, what: str) -> str:
    """'3 of 10 files encoded, rerun to continue' (existing outputs are skipped on a rerun)."""
    return f'{done} of {total} files {what}, rerun the same command to continue'
