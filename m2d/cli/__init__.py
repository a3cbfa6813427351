"""The `m2d` command line (also `python -m m2d`): `m2d COMMAND --help` describes each command.

Commands are registered in COMMANDS as name -> (module, one-line help). A command module provides
`add_arguments(parser)` and `run(args) -> exit code`; its docstring becomes the command's description.
Modules are imported only when their command runs (or for --help), so new commands cost nothing.
The published scripts (wav_to_lms.py, train_audio.py, python -m m2d.eval, python -m m2d.tools.demo) run the
same modules. Exit status: 0 done, 1 nothing produced (e.g. every input failed), 2 bad arguments or
data, 130 interrupted (Ctrl-C). docs/command-line.md describes the commands and their shared options.
"""
import importlib
import sys
from typing import Optional

from m2d.cli.common import ArgumentParser, run_tool

COMMANDS = {
    'wav2lms': ('m2d.tools.wav_to_lms', 'convert audio files to log-mel spectrogram .npy files for pre-training '
                                  '(as wav_to_lms.py)'),
    'pack': ('m2d.tools.pack', 'pack a pre-training CSV of LMS .npy files into shards for training at scale'),
    'train': ('m2d.cli.train', 'pre-train M2D on log-mel spectrogram files (as train_audio.py)'),
    'encode': ('m2d.tools.encode', 'encode audio files into M2D embeddings (.npy)'),
    'eval': ('m2d.eval.__main__', 'linear evaluation, fine-tuning, suites and summaries (as python -m m2d.eval)'),
    'demo': ('m2d.tools.demo', 'the main job on built-in demo data (as python -m m2d.tools.demo)'),
}


def main(argv: Optional[list[str]] = None) -> int:
    parser = ArgumentParser(prog='m2d', description=__doc__.split('\n\n')[0])
    commands = parser.add_subparsers(dest='command', metavar='COMMAND', required=True)
    for name, (_, help_text) in COMMANDS.items():
        commands.add_parser(name, help=help_text, add_help=False)
    known, _ = parser.parse_known_args(argv)  # which command; its own parser handles the rest
    args = sys.argv[1:] if argv is None else list(argv)
    module = importlib.import_module(COMMANDS[known.command][0])
    return run_tool(module, f'm2d {known.command}', args[args.index(known.command) + 1:])

