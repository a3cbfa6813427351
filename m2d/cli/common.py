"""What every command-line tool shares (`m2d COMMAND`, train_audio.py, wav_to_lms.py, python -m m2d.eval):
one line for m2d's errors (M2DError; exit status 2, 1 for a diverged training), a short line and status
130 on Ctrl-C, help that shows each option's default, and one `--norm_stats` syntax.

A tool module provides `add_arguments(parser)` and `run(args) -> exit status` (and optionally
`complete_args(args, argv)`); `run_tool` builds its parser and runs it. Its docstring is the tool's description.
"""
import argparse
import math
import sys
from types import ModuleType
from typing import Optional, Sequence

from m2d.errors import M2DError

EXIT_INTERRUPTED = 130  # what a shell reports for a process ended by SIGINT




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
    """run(*args) -> its exit status, with m2d's errors (M2DError) and Ctrl-C turned into one line on stderr."""
    try:
        return run(*args) or 0
    except M2DError as e:
        print(f'error: {e}', file=sys.stderr)
        return e.exit_status
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


def describe_interrupt(done: int, total: int, what: str) -> str:
    """'3 of 10 files encoded, rerun to continue' (existing outputs are skipped on a rerun)."""
    return f'{done} of {total} files {what}, rerun the same command to continue'
