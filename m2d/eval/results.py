"""The results CSV (one row per evaluation) and the weights x tasks summary table built from it."""
import datetime
import fcntl
import os
from pathlib import Path
from typing import Optional, Union

import pandas as pd

from m2d.errors import UsageError

RESULTS_ENV = 'M2D_EVAL_RESULTS'
DEFAULT_RESULTS = Path(os.environ.get(RESULTS_ENV) or Path('results') / 'scores.csv')
COLUMNS = ['weight', 'task', 'metric', 'score', 'seconds', 'date', 'mode', 'options']
# The published table's column order; other tasks follow alphabetically.
TASK_ORDER = ['esc50', 'us8k', 'spcv2', 'vc1', 'voxforge', 'cremad', 'gtzan', 'nsynth', 'surge']


def append_result(path: Union[str, Path], weight: str, task: str, metric: str, score: float, seconds: float,
                  mode: str = 'lineareval', options: str = '') -> dict:
    """Append one row (score in [0, 1]) to the results CSV, creating it with a header; returns the row.

    An exclusive lock keeps rows whole when background evaluations finish at the same time.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    row = dict(weight=str(weight), task=task, metric=metric, score=round(float(score), 6), seconds=round(seconds, 1),
               date=datetime.datetime.now().isoformat(timespec='seconds'), mode=mode, options=options)
    with open(path, 'a+') as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0, 2)
        pd.DataFrame([row], columns=COLUMNS).to_csv(f, header=f.tell() == 0, index=False)
    return row


def short_weight(weight: str) -> str:
    """'/a/b/m2d_vit_base-80x608p16x16-220930-mr7/checkpoint-300.pth'
    -> 'm2d_vit_base-80x608p16x16-220930-mr7/checkpoint-300'."""
    path = Path(weight)
    return f'{path.parent.name}/{path.stem}' if path.parent.name else path.stem


def summary_table(results: Union[str, Path, pd.DataFrame], weights: Optional[list[str]] = None,
                  mode: str = 'lineareval') -> pd.DataFrame:
    """weights x tasks table of the latest score (%) per pair, in the published column order."""
    df = pd.read_csv(results) if not isinstance(results, pd.DataFrame) else results
    if 'mode' in df.columns:
        df = df[df['mode'].fillna('lineareval') == mode]
    if weights:
        df = df[df.weight.isin([str(w) for w in weights])]
    if df.empty:
        return pd.DataFrame()
    df = df.drop_duplicates(['weight', 'task'], keep='last')
    table = df.pivot(index='weight', columns='task', values='score') * 100
    tasks = [t for t in TASK_ORDER if t in table.columns] + sorted(t for t in table.columns if t not in TASK_ORDER)
    table = table[tasks].loc[list(dict.fromkeys(df.weight))]
    table.index = [short_weight(w) for w in table.index]
    table.index.name = 'weight'
    return table.round(2)


def to_markdown(table: pd.DataFrame) -> str:
    """The published README's table style: | weight | esc50 | ... | with scores as 89.8%."""
    cols = ['weight', *table.columns]
    lines = ['| ' + ' | '.join(cols) + ' |', '|' + '---|' * len(cols)]
    for weight, row in table.iterrows():
        cells = ['' if pd.isna(v) else f'{v:.1f}%' for v in row]
        lines.append('| ' + ' | '.join([str(weight), *cells]) + ' |')
    return '\n'.join(lines)


def write_summary(results: Union[str, Path], weights: Optional[list[str]] = None, mode: str = 'lineareval') -> str:
    """Print-ready markdown summary; also saves summary.csv and summary.md beside the results CSV."""
    results = Path(results)
    if not results.is_file():
        raise UsageError(f'no results file {results}; run `python -m m2d.eval lineareval ...` first')
    table = summary_table(results, weights, mode)
    if table.empty:
        return f'(no {mode} results{" for these weights" if weights else ""} in {results})'
    md = to_markdown(table)
    stem = 'summary' if mode == 'lineareval' else f'summary-{mode}'
    table.to_csv(results.parent / f'{stem}.csv')
    (results.parent / f'{stem}.md').write_text(md + '\n')
    return md
