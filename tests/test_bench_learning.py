"""bench/bench_learning.py: skips cleanly without its system packages; end to end at a tiny size."""
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import learning_corpus

REPO = Path(__file__).resolve().parents[1]

TINY = ['--n_files', '24', '--task_clips', '5', '--probe_seeds', '1']
TINY_TRAIN = ['--epochs', '1', '--depth', '1', '--decoder_depth', '1', '--batch_size', '8']


def bench(*args: str, env: dict = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, '-m', 'bench.bench_learning', *args], cwd=REPO, capture_output=True,
                          text=True, env=env, timeout=600)


def test_skips_with_status_0_naming_what_is_missing(tmp_path):
    empty = tmp_path / 'bin'
    empty.mkdir()
    result = bench('--work', str(tmp_path / 'work'), env={**os.environ, 'PATH': str(empty)})
    assert result.returncode == 0, result.stderr
    assert 'bench_learning: skipped, this machine lacks espeak-ng (Debian package espeak-ng)' in result.stdout
    assert not (tmp_path / 'work').exists()


needs_tools = pytest.mark.skipif(bool(learning_corpus.missing_tools()),
                                 reason='needs ' + '; '.join(learning_corpus.missing_tools()) +
                                        ' (.ci/run installs them)')


@needs_tools
def test_pretrains_probes_and_further_pretrains(tmp_path):
    work = tmp_path / 'work'
    result = bench('--work', str(work), '--name', 'tiny', *TINY, '--', *TINY_TRAIN)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    for row in ('digits', 'language', 'instrument', 'mean'):
        assert any(line.startswith(row) for line in result.stdout.splitlines()), result.stdout
    metadata = list(csv.DictReader(open(work / 'tasks' / 'digits' / 'metadata.csv')))
    assert len(metadata) == 10 * 5 and {r['split'] for r in metadata} == {'train', 'valid', 'test'}
    checkpoint = next((work / 'runs' / 'tiny' / 'trained').glob('*/checkpoint-1.pth'))

    # Further pre-training on the speech clips only, from the run above: the start weights are probed too.
    result = bench('--work', str(work), '--name', 'further', *TINY, '--corpus_kinds', 'sentence,word', '--',
                   '--init_from', str(checkpoint), *TINY_TRAIN)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    speech = (work / 'data' / 'files-sentence-word.csv').read_text().splitlines()[1:]
    assert speech and all(line.startswith(('lms/sentence/', 'lms/word/')) for line in speech)

    rows = list(csv.DictReader(open(work / 'scores.csv')))
    weights = {(r['name'], r['weights']) for r in rows}
    # Every embedding, the log-mel baseline's too, is scored pooled both ways.
    embeddings = {'tiny': ('log-mel', 'random init', 'pre-trained'),
                  'further': ('log-mel', 'random init', 'start', 'pre-trained')}
    assert weights == {(name, w) for name, es in embeddings.items() for w in (*es, *(f'{e}, mean+std' for e in es))}
    assert len(rows) == 3 * (6 + 8) and all(0 <= float(r['score']) <= 100 for r in rows)
    assert 'embeddings: time mean and std (final layer; log-mel bins)' in result.stdout
    assert {r['flags'] for r in rows if r['name'] == 'further'} == {' '.join(['--init_from', str(checkpoint),
                                                                             *TINY_TRAIN])}
