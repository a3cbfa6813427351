"""The built-in evaluator (python -m m2d.eval): tasks, linear evaluation, fine-tuning, summary, suites, scripts."""
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch
from sklearn.metrics import average_precision_score

from m2d.audio.synth import write_labelled_task
from m2d.errors import TaskError
from m2d.eval.__main__ import main
from m2d.eval.augment import mask_bands, mixup, random_resized_crop
from m2d.eval.embeddings import pool, task_embeddings
from m2d.eval.finetune import FinetuneConfig, finetune
from m2d.eval.linear_probe import ProbeConfig, score
from m2d.eval.lineareval import linear_evaluation, probe_task
from m2d.eval.results import append_result, summary_table, write_summary
from m2d.eval.suite import run_suite
from m2d.eval.tasks import TaskData, TaskSpec, load_task, resolve_task

REPO = Path(__file__).resolve().parents[1]
KINDS = ('tone', 'clicks', 'noise_burst', 'chirp')


@pytest.fixture(scope='module')
def task_csv(tmp_path_factory) -> Path:
    """4 classes x (4 train, 2 valid, 2 test) clips of 1 s."""
    return write_labelled_task(tmp_path_factory.mktemp('task') / 'small', n_per_class=(4, 2, 2), seconds=1.0,
                               kinds=KINDS)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv('M2D_EVAL_CACHE', str(tmp_path / 'cache'))
    return tmp_path / 'cache'


def test_labelled_task_layout(task_csv, tmp_path):
    df = pd.read_csv(task_csv)
    assert list(df.columns) == ['file_name', 'label', 'split']
    assert df.groupby(['split', 'label']).size().unstack().loc[['train', 'valid', 'test']].values.tolist() == \
        [[4] * 4, [2] * 4, [2] * 4]
    info = sf.info(str(task_csv.parent / 'audio' / df.file_name[0]))
    assert (info.samplerate, info.channels, info.frames) == (16000, 1, 16000)
    multi = pd.read_csv(write_labelled_task(tmp_path / 'ml', n_per_class=(2, 1, 1), seconds=0.5, multi_label=True))
    assert multi.label.str.contains(',').any()
    folds = pd.read_csv(write_labelled_task(tmp_path / 'f', n_per_class=(2, 1, 0), seconds=0.5, kinds=KINDS, folds=3))
    assert 'split' not in folds and sorted(folds.fold.unique()) == [1, 2, 3]


def test_lineareval_end_to_end_with_results_row_and_cache(tiny_ckpt, task_csv, tmp_path, one_thread, capsys):
    results = tmp_path / 'scores.csv'
    first = linear_evaluation(tiny_ckpt, str(task_csv), results=results, batch_size=8)
    assert first['task'] == 'small' and first['metric'] == 'accuracy' and 0 <= first['score'] <= 1
    assert (first['n_clips'], first['classes'], first['cached']) == (32, 4, False)
    second = linear_evaluation(tiny_ckpt, str(task_csv), results=results, batch_size=8)
    assert second['cached'] and second['score'] == first['score']
    rows = pd.read_csv(results)
    assert list(rows.columns[:6]) == ['weight', 'task', 'metric', 'score', 'seconds', 'date']
    assert len(rows) == 2 and rows.weight[0] == str(tiny_ckpt) and rows.score[0] == pytest.approx(first['score'])
    # Other layers are other embeddings; a rewritten weight file is never served from the cache.
    assert not linear_evaluation(tiny_ckpt, str(task_csv), results=None, output_layers=[-1, 0])['cached']
    os.utime(tiny_ckpt, ns=(0, os.stat(tiny_ckpt).st_mtime_ns + 10**9))
    assert not linear_evaluation(tiny_ckpt, str(task_csv), results=None)['cached']
    main(['lineareval', str(tiny_ckpt), str(task_csv), '--results', str(results), '--patience', '5'])
    assert 'small: accuracy' in capsys.readouterr().out and len(pd.read_csv(results)) == 3


def test_mean_std_pooling(tiny_ckpt, task_csv, tmp_path, one_thread):
    frames = torch.randn(3, 5, 4)
    assert torch.equal(pool(frames), frames.mean(1))
    both = pool(frames, 'mean+std')
    assert both.shape == (3, 8) and torch.equal(both[:, 4:], frames.std(1, correction=0))
    assert torch.equal(pool(frames[:, :1], 'mean+std')[:, 4:], torch.zeros(3, 4))  # one frame: std 0, not NaN
    with pytest.raises(ValueError, match="pooling 'max': use one of mean, mean\\+std"):
        pool(frames, 'max')

    task = load_task(resolve_task(str(task_csv)))
    mean, _ = task_embeddings(tiny_ckpt, task, batch_size=8)
    mean_std, cached = task_embeddings(tiny_ckpt, task, batch_size=8, pooling='mean+std')
    assert not cached and mean_std.shape == (32, 2 * mean.shape[1])
    np.testing.assert_allclose(mean_std[:, :mean.shape[1]], mean, atol=1e-6)
    assert (mean_std[:, mean.shape[1]:] > 0).all()
    row = linear_evaluation(tiny_ckpt, str(task_csv), results=tmp_path / 'scores.csv', pooling='mean+std')
    assert row['cached'] and row['options'].endswith('pooling=mean+std')
    main(['lineareval', str(tiny_ckpt), str(task_csv), '--results', str(tmp_path / 'scores.csv'),
          '--pooling', 'mean+std'])
    assert pd.read_csv(tmp_path / 'scores.csv').options.str.endswith('pooling=mean+std').all()


def test_fixed_norm_stats(tiny_ckpt, task_csv, tmp_path, monkeypatch, one_thread):
    """--norm_stats: every LMS is normalised with the given statistics (as EVAR's M2D wrapper with mean/std
    set), so the embeddings are RuntimeM2D's with those stats; lineareval, suite and finetune take it."""
    from m2d.eval.embeddings import clip_loader
    from m2d.eval.finetune import FinetuneModel
    from m2d.runtime.runtime import RuntimeM2D
    results = tmp_path / 'scores.csv'
    assert main(['lineareval', str(tiny_ckpt), str(task_csv), '--results', str(results), '--batch_size', '8',
                 '--norm_stats', '[-5.0, 3.0]']) == 0
    task = load_task(resolve_task(str(task_csv)))
    fixed, _ = task_embeddings(tiny_ckpt, task, batch_size=8, cache_dir='',
                               runtime_settings={'norm_stats': [-5.0, 3.0]})
    audio = torch.cat(list(clip_loader(task.files, 1.0, 8, sample_rate=16000)))
    expected = RuntimeM2D(weight_file=str(tiny_ckpt), norm_stats=[-5.0, 3.0]).encode(audio).mean(1)
    torch.testing.assert_close(torch.from_numpy(fixed), expected, atol=1e-5, rtol=1e-4)
    dataset_norm, _ = task_embeddings(tiny_ckpt, task, batch_size=8, cache_dir='')  # the default: training-set stats
    assert not np.allclose(fixed, dataset_norm, atol=1e-3)
    assert main(['suite', str(tiny_ckpt), '--tasks', str(task_csv), '--results', str(results),
                 '--norm_stats', '-5', '3']) == 0

    stats = []
    init = FinetuneModel.__init__
    monkeypatch.setattr(FinetuneModel, '__init__', lambda self, runtime, n_classes, s, *args, **kwargs:
                        stats.append(s) or init(self, runtime, n_classes, s, *args, **kwargs))
    assert main(['finetune', str(tiny_ckpt), str(task_csv), '--results', str(results), '--batch_size', '8',
                 '--epochs', '1', '--warmup_epochs', '0', '--norm_stats', '[-5.0, 3.0]']) == 0
    assert stats == [(-5.0, 3.0)]
    options = pd.read_csv(results).options.tolist()
    assert len(options) == 3 and all('norm_stats=[-5.0, 3.0]' in o for o in options)


def test_evar_tasks_from_the_data_root(tiny_ckpt, task_csv, tmp_path, monkeypatch, one_thread):
    """EVAR's layout below $M2D_EVAL_DATA: a split task (cremad) and a fold task (esc50, folds averaged)."""
    root = tmp_path / 'evar'
    (root / 'evar' / 'metadata').mkdir(parents=True)
    (root / 'work' / '16k').mkdir(parents=True)
    (root / 'evar' / 'metadata' / 'cremad.csv').write_text(task_csv.read_text())
    (root / 'work' / '16k' / 'cremad').symlink_to(task_csv.parent / 'audio')
    folds = write_labelled_task(tmp_path / 'f', n_per_class=(2, 1, 0), seconds=0.5, kinds=KINDS, folds=3)
    (root / 'evar' / 'metadata' / 'esc50.csv').write_text(folds.read_text())
    (root / 'work' / '16k' / 'esc50').symlink_to(folds.parent / 'audio')
    monkeypatch.setenv('M2D_EVAL_DATA', str(root))
    assert resolve_task('cremad').seconds == 2.5 and resolve_task('esc50').seconds == 5.0  # EVAR's clip lengths
    rows = run_suite(tiny_ckpt, 'all', tasks=['cremad', 'esc50', 'gtzan'], results=tmp_path / 'scores.csv')
    assert [r['task'] for r in rows] == ['cremad', 'esc50']  # gtzan has no data: skipped
    assert len(rows[1]['folds']) == 3 and rows[1]['score'] == pytest.approx(np.mean(rows[1]['folds']), abs=1e-6)


def test_weight_errors(task_csv, tmp_path, capsys):
    with pytest.raises(ValueError, match='--model and --input_size'):
        linear_evaluation('random', str(task_csv), results=None)
    assert main(['lineareval', str(tmp_path / 'no-such.pth'), str(task_csv)]) == 2
    assert re.fullmatch(r'error: lineareval: weight file not found: .*no-such.pth\n', capsys.readouterr().err)
    (tmp_path / 'm2d_vit_tiny-80x208p16x16-x').mkdir()
    (tmp_path / 'm2d_vit_tiny-80x208p16x16-x' / 'corrupt.pth').write_bytes(b'PK\x03\x04 not really a zip')
    assert main(['lineareval', str(tmp_path / 'm2d_vit_tiny-80x208p16x16-x' / 'corrupt.pth'), str(task_csv)]) == 2
    err = capsys.readouterr().err
    assert err.startswith('error: lineareval: ') and 'corrupt.pth' in err and len(err.splitlines()) == 1


def _blobs(rng, n_per_class, n_classes, dim=8):
    y = np.repeat(np.arange(n_classes), n_per_class)
    centres = rng.normal(size=(n_classes, dim)) * 4
    return (centres[y] + rng.normal(size=(len(y), dim))).astype(np.float32), y


def test_fold_scores_are_averaged(one_thread):
    rng = np.random.default_rng(0)
    x, y = _blobs(rng, 30, 3)
    fold = np.tile([1, 2, 3], len(y) // 3)
    task = TaskData(TaskSpec('t', Path('m.csv'), Path('.'), 1.0), [Path(f'{i}.wav') for i in range(len(y))], y,
                    ['a', 'b', 'c'], False, None, fold)
    out = probe_task(x, task, ProbeConfig(epochs=50))
    assert len(out['folds']) == 3 and out['score'] == pytest.approx(np.mean(out['folds']))
    assert out['score'] > 0.9
    for k in (1, 2, 3):  # each fold is test once; valid comes out of the other folds
        idx = task.indices(k)
        assert set(idx['test']) == set(np.flatnonzero(fold == k))
        assert not set(idx['train']) & set(idx['valid']) and not set(idx['valid']) & set(idx['test'])


def test_multi_label_uses_map(one_thread):
    rng = np.random.default_rng(1)
    y = (rng.random((120, 4)) < 0.4).astype(np.float32)
    y[y.sum(1) == 0, 0] = 1
    x = (y @ rng.normal(size=(4, 16)) * 3 + rng.normal(size=(120, 16))).astype(np.float32)
    split = np.array(['train'] * 80 + ['valid'] * 20 + ['test'] * 20)
    task = TaskData(TaskSpec('t', Path('m.csv'), Path('.'), 1.0), [Path('x')] * 120, y, list('abcd'), True, split, None)
    out = probe_task(x, task, ProbeConfig(epochs=100))
    assert out['metric'] == 'mAP' and out['score'] > 0.8
    logits = torch.tensor([[2.0, -1.0], [-1.0, 0.5], [0.5, 1.0]])
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    assert score(logits, targets, True) == pytest.approx(average_precision_score(targets, logits, average='macro'))


def test_finetune_runs_and_writes_results(tiny_ckpt, task_csv, tmp_path, one_thread):
    results = tmp_path / 'scores.csv'
    cfg = FinetuneConfig(lr=0.01, batch_size=8, epochs=2, warmup_epochs=1, mixup=0.3, freq_mask=10, time_mask=20,
                         rrc=True, training_mask=0.5, early_stop=5)
    row = finetune(tiny_ckpt, str(task_csv), cfg, results=results)
    assert row['mode'] == 'finetune' and row['epochs_run'] == 2 and 0 <= row['score'] <= 1
    saved = pd.read_csv(results)
    assert saved['mode'].tolist() == ['finetune'] and 'training_mask=0.5' in saved.options[0]
    row = finetune(tiny_ckpt, str(task_csv), FinetuneConfig(optim='adamw', lr=1e-4, batch_size=16, epochs=1,
                                                            warmup_epochs=0, rrc=False), results=None)
    assert row['epochs_run'] == 1


def test_summary_table_and_cli(tmp_path, capsys):
    results = tmp_path / 'scores.csv'
    for weight, task, s in [('/r/m2d_vit_base-80x608p16x16-220930-mr7/checkpoint-300.pth', 'demo', 0.5),
                            ('/r/m2d_vit_base-80x608p16x16-220930-mr7/checkpoint-300.pth', 'esc50', 0.898),
                            ('/r/m2d_vit_base-80x608p16x16-220930-mr7/checkpoint-300.pth', 'demo', 0.75),
                            ('/r/other-80x208p16x16-x/checkpoint-1.pth', 'cremad', 0.5)]:
        append_result(results, weight, task, 'accuracy', s, 1.0)
    append_result(results, '/r/other-80x208p16x16-x/checkpoint-1.pth', 'cremad', 'accuracy', 0.9, 1.0, mode='finetune')
    table = summary_table(results)
    assert list(table.columns) == ['esc50', 'cremad', 'demo']  # published order first, then the rest
    assert table.loc['m2d_vit_base-80x608p16x16-220930-mr7/checkpoint-300', 'demo'] == 75.0  # latest row wins
    assert table.loc['other-80x208p16x16-x/checkpoint-1', 'cremad'] == 50.0  # fine-tuning rows kept apart
    main(['summary', str(results)])
    out = capsys.readouterr().out
    assert '| weight | esc50 | cremad | demo |' in out
    assert '| m2d_vit_base-80x608p16x16-220930-mr7/checkpoint-300 | 89.8% |  | 75.0% |' in out
    assert (tmp_path / 'summary.csv').is_file() and (tmp_path / 'summary.md').read_text().strip() == out.strip()
    assert '90.0%' in write_summary(results, mode='finetune')


def test_suite_runs_evar_when_evar_root_is_set(tiny_ckpt, tmp_path):
    evar = tmp_path / 'evar'
    evar.mkdir()
    log = tmp_path / 'calls.txt'
    for script in ('lineareval.py', 'summarize.py'):
        (evar / script).write_text(f'import sys\nopen({str(log)!r}, "a").write(" ".join(sys.argv) + "\\n")\n')
    run_suite(tiny_ckpt, 'all', tasks=['cremad', 'esc50'], results=tmp_path / 'scores.csv', evar_checkout=str(evar))
    assert log.read_text().splitlines() == [f'lineareval.py config/m2d.yaml cremad weight_file={tiny_ckpt}',
                                            f'lineareval.py config/m2d.yaml esc50 weight_file={tiny_ckpt}',
                                            f'summarize.py {tiny_ckpt}']


def test_shell_scripts_run_the_suite(tiny_ckpt, task_csv, tmp_path, cache):
    """Both scripts run `m2d eval suite` in the caller's folder: results go to its ./results (or --results)."""
    env = {**os.environ, 'M2D_PYTHON': sys.executable, 'M2D_EVAL_CACHE': str(cache), 'OMP_NUM_THREADS': '1'}
    for name in ('M2D_EVAL_DATA', 'EVAR_ROOT', 'M2D_EVAL_RESULTS'):
        env.pop(name, None)
    given = tmp_path / 'scores.csv'
    for script, options in (('quick_eval.sh', ['--tasks', str(task_csv), '--results', str(given)]),
                            ('all_eval.sh', ['--tasks', str(task_csv), 'esc50'])):
        done = subprocess.run(['bash', str(REPO / script), str(tiny_ckpt), *options],
                              cwd=tmp_path, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        assert '| weight | small |' in done.stdout
    assert 'Skipped (data not found): esc50' in done.stdout
    in_the_callers_folder = tmp_path / 'results' / 'scores.csv'
    assert pd.read_csv(given).task.tolist() == pd.read_csv(in_the_callers_folder).task.tolist() == ['small']
    assert (tmp_path / 'results' / 'summary.md').is_file()


# ----- bad input: a clear error before any encoding (the weight below does not even exist) -----

def empty_fold(df: pd.DataFrame) -> pd.DataFrame:
    """The task as a fold task, one of whose rows has no fold number."""
    return df.drop(columns='split').assign(fold=np.where(df.index == 3, np.nan, df.index % 2 + 1))


def _variant(task_csv: Path, tmp_path: Path, edit) -> str:
    df = edit(pd.read_csv(task_csv))
    path = tmp_path / 'bad.csv'
    df.to_csv(path, index=False)
    return str(path)


@pytest.mark.parametrize('edit, message', [
    (lambda df: df.assign(file_name=df.file_name.where(df.index > 1, 'gone/nothing.wav')),
     r'2 of 32 listed audio files are missing(.|\n)*gone/nothing.wav'),
    (lambda df: df[df.split != 'valid'], 'split valid has no samples'),
    (lambda df: df.assign(label=df.label.where(df.split != 'test', 'unseen')),
     r"split test has labels that no training sample has: \['unseen'\]"),
    (lambda df: df.assign(label='tone'), 'only one class'),
    (lambda df: df.drop(columns='split'), 'needs columns file_name, label and split'),
    (lambda df: df.drop(columns='split').assign(fold=1), 'single fold'),
    (empty_fold,
     r'1 rows of .*bad.csv have an empty fold: line 5 \(.*\.wav\); give every row a fold number'),
    (lambda df: df.assign(split=df.split.where(df.index != 0)),
     r'1 rows of .*bad.csv have an empty split: line 2 \(.*\.wav\); give every row a split \(train, valid or test\)'),
    (lambda df: df.assign(label=df.label.where(~df.index.isin([3, 9]), np.nan)),
     r"2 rows of .*bad.csv have an empty or NaN label: line 5 \(.*\.wav\), line 11 \(.*\.wav\); give every row"),
    (lambda df: df.assign(label=df.label.where(df.index != 0, 'nan')), r'1 rows .* empty or NaN label: line 2 '),
    (lambda df: df.assign(label=df.label.where(df.index != 0, 'tone,NaN')), r'1 rows .* empty or NaN label: line 2 '),
    (lambda df: df.assign(file_name=df.file_name.where(df.index != 4, '../../etc/passwd')),
     r'1 file names point outside --data_path \(absolute or with \.\.\): line 6: \.\./\.\./etc/passwd'),
    (lambda df: df.assign(file_name=df.file_name.where(df.index != 0, '/abs/x.wav')), r'line 2: /abs/x.wav'),
])
def test_bad_task_input_fails_before_encoding(task_csv, tmp_path, edit, message):
    path = _variant(task_csv, tmp_path, edit)
    with pytest.raises(TaskError, match=message):
        linear_evaluation(tmp_path / 'no-such-weight.pth', path, data_path=str(task_csv.parent / 'audio'), results=None)


def test_bad_options_and_an_empty_fold_are_one_line_errors_with_nothing_appended(tiny_ckpt, task_csv, tmp_path, capsys):
    results = tmp_path / 'scores.csv'
    bad_folds = _variant(task_csv, tmp_path, empty_fold)
    folds = str(write_labelled_task(tmp_path / 'f', n_per_class=(2, 1, 0), seconds=0.5, kinds=KINDS, folds=3))
    ckpt, task = str(tiny_ckpt), str(task_csv)
    for argv, message in [
        (['lineareval', ckpt, task, '--batch_size', '0'],
         re.escape('lineareval: --batch_size must be at least 1, got 0')),
        (['suite', ckpt, '--tasks', task, '--batch_size', '-4'],
         re.escape('suite: --batch_size must be at least 1, got -4')),
        (['lineareval', ckpt, task, '--epochs', '0'], re.escape('lineareval: --epochs must be at least 1, got 0')),
        (['finetune', ckpt, task, '--num_workers', '-1'],
         re.escape('finetune: --num_workers must be 0 or more, got -1')),
        (['finetune', ckpt, task, '--fold', '0'], re.escape('finetune: --fold must be at least 1, got 0')),
        (['lineareval', ckpt, task, '--clip_seconds', '0'],
         re.escape('lineareval: --clip_seconds must be above 0 seconds, got 0.0')),
        (['finetune', ckpt, folds, '--fold', '4'],
         re.escape("finetune: no fold 4 in task 'f': its 3 folds are numbered 1 to 3")),
        (['lineareval', ckpt, bad_folds, '--audio_root', str(task_csv.parent / 'audio')],
         rf"lineareval: task 'bad': 1 rows of {re.escape(bad_folds)} have an empty fold: line 5 \(train/\w+\.wav\); "
         'give every row a fold number'),
    ]:
        assert main([*argv, '--results', str(results)]) == 2, argv
        assert re.fullmatch(f'error: {message}\n', capsys.readouterr().err), argv
    assert not results.exists()  # no row, not even an empty one


def test_finetune_command_without_batch_size_takes_the_default(tiny_ckpt, task_csv, tmp_path, one_thread):
    results = tmp_path / 'scores.csv'
    assert main(['finetune', str(tiny_ckpt), str(task_csv), '--epochs', '1', '--warmup_epochs', '0',
                 '--results', str(results)]) == 0
    assert 'batch_size=128' in pd.read_csv(results).options[0]


def test_unknown_task_and_missing_data_root(tmp_path, monkeypatch, capsys):
    with pytest.raises(TaskError, match='unknown task .nosuch.; known tasks: demo, esc50, us8k'):
        resolve_task('nosuch')
    monkeypatch.delenv('M2D_EVAL_DATA', raising=False)
    with pytest.raises(TaskError, match='set M2D_EVAL_DATA'):
        resolve_task('cremad')
    assert main(['lineareval', str(tmp_path / 'w.pth'), 'nosuch']) == 2
    assert capsys.readouterr().err.startswith("error: lineareval: unknown task 'nosuch'")
    (tmp_path / 'empty.csv').write_text('')
    assert main(['lineareval', str(tmp_path / 'w.pth'), str(tmp_path / 'empty.csv')]) == 2
    assert f'metadata file {tmp_path / "empty.csv"} is empty' in capsys.readouterr().err
    monkeypatch.setenv('M2D_EVAL_DATA', str(tmp_path))
    with pytest.raises(TaskError, match='metadata file not found.*evar/metadata/cremad.csv'):
        load_task(resolve_task('cremad'))


def test_augmentations_keep_shape_and_mask_bands():
    torch.manual_seed(0)
    x = torch.randn(4, 1, 80, 100) + 5
    masked = mask_bands(x, 30, 2)
    zero_rows = (masked == 0).all(dim=3).squeeze(1)  # [B, F]
    assert masked.shape == x.shape and (zero_rows.sum(1) < 30).all() and zero_rows.any()
    assert ((mask_bands(x, 50, 3) == 0).all(dim=2).squeeze(1).sum(1) < 50).all()
    assert random_resized_crop(x).shape == x.shape
    y = torch.eye(4)
    assert mixup(x, y, 0.0)[0] is x
    xm, ym = mixup(x, y, 0.5)
    assert torch.allclose(ym.sum(1), torch.ones(4))


def test_an_unwritable_cache_costs_only_the_cache(tiny_ckpt, task_csv, tmp_path, capsys, one_thread):
    (tmp_path / 'a_file').write_text('x')
    row = linear_evaluation(tiny_ckpt, str(task_csv), results=None, batch_size=8, cache_dir=str(tmp_path / 'a_file'))
    assert 0 <= row['score'] <= 1 and not row['cached']
    assert f'Note: embeddings not cached (cannot write {tmp_path / "a_file"}/small-' in capsys.readouterr().err
