"""Evaluation suites: linear evaluation of one checkpoint on a list of tasks, then the summary table.

Tasks whose data is absent are skipped with a note, so the same suite runs on a laptop (demo task
only) and on a machine with EVAR's datasets (--evar_root or $M2D_EVAL_DATA). With $EVAR_ROOT pointing to
an EVAR checkout (set up as in docs/evaluation.md) the EVAR tasks run through EVAR's own lineareval.py instead.
"""
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence, Union

from m2d.errors import TaskError, UsageError
from m2d.eval import EARLIER_KEYWORDS, renamed_keywords
from m2d.eval.lineareval import linear_evaluation
from m2d.eval.results import DEFAULT_RESULTS, TASK_ORDER, write_summary
from m2d.eval.tasks import DATA_ROOT_ENV, EVAR_TASKS, resolve_task, task_available

SUITES = {
    'quick': ('demo', 'cremad', 'gtzan'),  # small tasks, run on checkpoints during pre-training
    'all': ('demo', *TASK_ORDER),           # the published table's tasks
}
EVAR_ROOT_ENV = 'EVAR_ROOT'


def run_evar(weight: str, task: str, evar_root: Path) -> int:
    """EVAR's own linear evaluation of one task: python lineareval.py config/m2d.yaml TASK weight_file=W."""
    cmd = [sys.executable, 'lineareval.py', 'config/m2d.yaml', task, f'weight_file={weight}']
    print(f'\n$ (cd {evar_root} && {shlex.join(cmd)})', flush=True)
    return subprocess.run(cmd, cwd=evar_root).returncode


@renamed_keywords(**EARLIER_KEYWORDS)
def run_suite(weight_file: Union[str, Path], config: str = 'quick', tasks: Optional[Sequence[str]] = None,
              results: Union[str, Path] = DEFAULT_RESULTS, evar_root: Optional[str] = None,
              evar_checkout: Optional[str] = None, **lineareval_kwargs) -> list[dict]:
    """Linear-evaluate `weight_file` on the suite's tasks (or `tasks`), print and save the summary; return the rows.

    evar_root: where EVAR task names find their data (default $M2D_EVAL_DATA); evar_checkout: an EVAR
    checkout whose own lineareval.py evaluates the EVAR tasks instead (default $EVAR_ROOT).
    Raises TaskError after the last task when any task failed (the others still run).
    """
    if config not in SUITES:
        raise UsageError(f'unknown suite {config!r}; choose from {", ".join(SUITES)}')
    tasks = list(tasks or SUITES[config])
    evar_checkout = evar_checkout or os.environ.get(EVAR_ROOT_ENV)
    weight = str(Path(weight_file).resolve()) if str(weight_file) != 'random' else 'random'
    rows, failed, skipped = [], [], []
    for task in tasks:
        if evar_checkout and task in EVAR_TASKS:
            if run_evar(weight, task, Path(evar_checkout)) != 0:
                failed.append(f'{task}: EVAR lineareval.py failed')
            continue
        try:
            spec = resolve_task(task, evar_root)
            if task in EVAR_TASKS and not task_available(spec):
                skipped.append(f'{task} (no {spec.metadata} or {spec.audio_root})')
                continue
            print(f'\n[{config}] {task}', flush=True)
            row = linear_evaluation(weight, task, evar_root=evar_root, results=results, **lineareval_kwargs)
            print(f'[{config}] {task}: {row["metric"]} {100 * row["score"]:.2f}% ({row["seconds"]} s)', flush=True)
            rows.append(row)
        except TaskError as e:
            if task in EVAR_TASKS and DATA_ROOT_ENV in str(e):
                skipped.append(f'{task} (no data root)')
            else:
                failed.append(f'{task}: {e}')
    if skipped:
        print(f'\nSkipped (data not found): {", ".join(skipped)}')
    if evar_checkout and any(t in EVAR_TASKS for t in tasks):
        subprocess.run([sys.executable, 'summarize.py', weight], cwd=evar_checkout)
    if Path(results).is_file():
        print(f'\nLinear evaluation summary ({results}):\n{write_summary(results)}')
    if failed:
        raise TaskError('some tasks failed:\n  ' + '\n  '.join(failed))
    return rows
