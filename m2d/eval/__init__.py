"""Built-in evaluation: linear probes and fine-tuning on EVAR-format task lists (python -m m2d.eval)."""
import functools
from typing import Callable


def renamed_keywords(**new_names: str) -> Callable:
    """Decorator: the function still takes its earlier keyword names, given as old='new' (e.g. weight='weight_file'),
    so callers written before the shared vocabulary of docs/command-line.md keep working."""
    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def call(*args, **kwargs):
            for old, new in new_names.items():
                if old in kwargs:
                    if new in kwargs:
                        raise TypeError(f'{fn.__name__}() got both {new}= and its earlier name {old}=')
                    kwargs[new] = kwargs.pop(old)
            return fn(*args, **kwargs)
        return call
    return wrap


# The keywords the evaluation functions had before (old name -> new name).
EARLIER_KEYWORDS = dict(weight='weight_file', data_root='evar_root', audio_root='data_path', seconds='clip_seconds')
