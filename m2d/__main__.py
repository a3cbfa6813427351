"""The `m2d` command line (also `python -m m2d`): `m2d COMMAND --help` describes each command.

Commands are registered in COMMANDS as name -> (module, one-line help). A command module provides
`add_arguments(parser)` and `run(args) -> exit code`; its docstring becomes the command's description.
Modules are imported only when their command runs (or for --help), so new commands cost nothing.
"""
import argparse
import importlib
import sys
from typing import Optional

COMMANDS = {
    'encode': ('m2d.encode_files', 'encode audio files into M2D embeddings (.npy)'),
}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog='m2d', description='Masked Modeling Duo (M2D) tools.')
    commands = parser.add_subparsers(dest='command', metavar='COMMAND', required=True)
    for name, (_, help_text) in COMMANDS.items():
        commands.add_parser(name, help=help_text, add_help=False)
    known, _ = parser.parse_known_args(argv)  # which command; its own parser handles the rest
    module = importlib.import_module(COMMANDS[known.command][0])
    command = argparse.ArgumentParser(prog=f'm2d {known.command}', description=module.__doc__,
                                      formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(command)
    args = sys.argv[1:] if argv is None else list(argv)
    return module.run(command.parse_args(args[args.index(known.command) + 1:]))


if __name__ == '__main__':
    sys.exit(main())
