"""The run's console copy: stdout, also written to RUN/console.txt once the run folder exists."""
import contextlib
import io
import sys
from pathlib import Path
from typing import Iterator, Optional, TextIO

from m2d.errors import OutputError
from m2d.outputs import writing


class ConsoleCopy:
    """stdout, copied into a file from `open(path)` on; what was printed before is written there first,
    so a run that fails its checks before its folder exists leaves nothing behind."""

    def __init__(self, stream: TextIO):
        self.stream, self.path, self.file = stream, None, None
        self.pending: Optional[io.StringIO] = io.StringIO()

    def open(self, path: Path) -> None:
        with writing(path):
            self.file = open(path, 'a', buffering=1)
        self.path = path
        self.note(self.pending.getvalue())
        self.pending = None

    def note(self, text: str) -> None:
        """Write `text` to the copy only (not to the screen)."""
        if self.file is None:
            if self.pending is not None:
                self.pending.write(text)
            return
        try:
            self.file.write(text)
        except OSError as e:
            self.close()  # stop copying: the error message itself must still reach the screen
            raise OutputError(self.path, e) from e

    def write(self, text: str) -> int:
        self.stream.write(text)
        self.note(text)
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def close(self) -> None:
        file, self.file, self.pending = self.file, None, None
        if file is not None:
            with contextlib.suppress(OSError):  # a full disk: the error was reported when the line was written
                file.close()

@contextlib.contextmanager
def console_copy(enabled: bool) -> Iterator[Optional[ConsoleCopy]]:
    """Route stdout through a ConsoleCopy while the block runs (None and no copy when not enabled)."""
    if not enabled:
        yield None
        return
    saved = sys.stdout
    sys.stdout = copy = ConsoleCopy(saved)
    try:
        yield copy
    finally:
        sys.stdout = saved
        copy.close()
