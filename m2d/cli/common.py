"""What every command-line tool shares (`m2d COMMAND`, train_audio.py, wav_to_lms.py, python -m m2d.eval):
one line for m2d's errors (M2DError; exit status 2, 1 for a diverged training) and for a bad option value
(exit status 2), a short line and status 130 on Ctrl-C, help that shows each option's default, and one
spelling for the options every tool has: --device, --norm_stats and --dataset_norm / --no_dataset_norm.

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
EXIT_USAGE = 2          # bad arguments or data


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written; an option's help ends with its default unless it names one itself.

    Switches (--frames, --no_pin_mem) show none: each is off unless given, and a --no_X switch's help says
    what is on without it. An empty default (None, '', []) is never shown as such: the help says what it
    resolves to (tests/test_cli.py checks that every option's help names its default)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ''
        empty = action.default is None or (isinstance(action.default, (str, list)) and not action.default)
        if (not action.option_strings or action.nargs == 0 or 'default' in text or empty
                or action.default is argparse.SUPPRESS):
            return text
        return f'{text} (default: %(default)s)'

    def _format_args(self, action: argparse.Action, default_metavar: str) -> str:
        if isinstance(action, _NormStatsAction):  # one or two words, shown as the published form
            return action.metavar
        return super()._format_args(action, default_metavar)


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, with a bad or missing value reported in one line, `error: ... (see PROG --help)`,
    instead of the whole usage block (exit status 2). Sub-command parsers are of this class too."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault('formatter_class', HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(EXIT_USAGE, f'error: {message} (see {self.prog} --help)\n')


def build_parser(module: ModuleType, prog: str) -> ArgumentParser:
    """The argument parser of a tool module (its docstring as the description)."""
    parser = ArgumentParser(prog=prog, description=module.__doc__)
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


def add_normalisation_arguments(parser: argparse.ArgumentParser, data: str, alone: str) -> None:
    """How log-mel spectrograms are normalised before encoding, one spelling for `m2d encode` and `m2d eval`:
    --dataset_norm (the default), --no_dataset_norm or --norm_stats, one at most. data: whose statistics
    --dataset_norm uses; alone: what --no_dataset_norm normalises with its own statistics."""
    group = parser.add_mutually_exclusive_group()
    add_norm_stats_argument(group, help='normalise with these fixed statistics (also: --norm_stats MEAN STD) '
                                        '(default: --dataset_norm)')
    group.add_argument('--dataset_norm', action='store_true', default=True,
                       help=f'normalise with the mean and std of {data}, as the published evaluation (EVAR) '
                            'does, under which the published scores were measured; weights that store their own '
                            'statistics (later formats) use those (the default)')
    group.add_argument('--no_dataset_norm', '--no-dataset_norm', action='store_false', dest='dataset_norm',
                       help=f"normalise {alone} with its own mean and std instead (RuntimeM2D.encode's way; "
                            'weights that store statistics still use those)')


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """What to build when the weight file's folder name does not tell it, and --trust_checkpoint."""
    parser.add_argument('--model', default='',
                        help="model name, e.g. m2d_vit_base (default: the checkpoint's stored args, else the weight "
                             "file's folder name, e.g. m2d_vit_base-80x608p16x16-220930-mr7)")
    parser.add_argument('--input_size', default=None,
                        help='model input F x T, e.g. 80x608 (default: as --model, from the checkpoint or its '
                             'folder name)')
    parser.add_argument('--patch_size', default=None,
                        help='patch size F x T, e.g. 16x16 (default: as --model, from the checkpoint or its '
                             'folder name)')
    parser.add_argument('--trust_checkpoint', action='store_true',
                        help='unpickle anything in the weight file (it could run code): only for files you trust '
                             '(without it: tensors and containers only)')


def add_device_argument(parser: argparse.ArgumentParser) -> argparse.Action:
    """--device, the same for every tool that runs the model."""
    return parser.add_argument('--device', default='auto',
                               help='where the model runs: auto (cuda if available, else cpu), cpu or cuda')


def describe_interrupt(done: int, total: int, what: str) -> str:
    """'3 of 10 files encoded, rerun to continue' (existing outputs are skipped on a rerun)."""
    return f'{done} of {total} files {what}, rerun the same command to continue'
