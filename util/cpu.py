"""How many CPU cores this process may use, and how many of them other processes leave idle."""
import os


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask; every core where that is unknown)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)


def idle_cores() -> int:
    """Usable cores minus the machine's load over the last minute (runnable processes), at least 1.

    On a shared machine, compute threads beyond the idle cores only wait for each other: training a
    small model on a 2-core machine busy with two other jobs ran 2.4-3x faster on 1 thread than on 2.
    """
    load = os.getloadavg()[0] if hasattr(os, 'getloadavg') else 0.0
    return max(1, int(usable_cores() - load + 0.5))
