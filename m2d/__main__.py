"""`python -m m2d COMMAND ...`: the `m2d` command line (m2d.cli)."""
import sys

from m2d.cli import main

if __name__ == '__main__':
    sys.exit(main())
