"""The GPU benches and the prepared GPU session, on the CPU at toy sizes: every path that needs no GPU."""
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from conftest import make_lms_dataset

from bench import bench_encode_mfu, bench_train, loss_curves
from bench.mfu import peak_tflops

REPO = Path(__file__).resolve().parents[1]
TINY = ['--quick', '--shapes', '80x64p16x4', '--peak_tflops', '1']


def test_every_eager_setting_runs_with_its_step_split_and_mfu(one_thread):
    rows = bench_train.main([*TINY, '--settings', *bench_train.QUICK_SETTINGS, '--batches', '2'])
    assert [r['setting'] for r in rows] == bench_train.QUICK_SETTINGS
    for r in rows:
        assert r['status'] == 'ok', r
        assert set(r['phases_ms']) == {'data', 'forward', 'backward', 'optimizer', 'ema'}
        assert r['samples_per_s'] > 0 and r['mfu'] == pytest.approx(r['tflops'])  # a peak of 1 TFLOP/s
        assert r['loss'] == pytest.approx(rows[0]['loss'], rel=0.05)  # same weights, input and masks; precision differs
    assert len({r['gflop_per_sample'] for r in rows}) == 1  # the same model FLOPs whatever the kernels


def test_the_sweep_stops_at_the_first_oom_and_the_rest_runs_at_the_largest_fit(monkeypatch, one_thread):
    real = bench_train.TrainStep.__init__

    def small_memory(self, build, shape, setting, batch, *args):
        if batch >= 8:
            raise torch.OutOfMemoryError('CUDA out of memory (simulated)')
        real(self, build, shape, setting, batch, *args)

    monkeypatch.setattr(bench_train.TrainStep, '__init__', small_memory)
    rows = bench_train.main([*TINY, '--settings', 'fp16-scaler', '--batches', 'max'])
    assert [(r['batch'], r['sweep'], r['status']) for r in rows] == [
        (2, True, 'ok'), (4, True, 'ok'), (8, True, 'OOM'), (4, False, 'ok')]
    skipped = bench_train.main([*TINY, '--settings', 'fp32', '--batches', '2', '--deadline', '1e-9'])
    assert [r['status'] for r in skipped] == ['skipped (time)']


def test_peak_table_picks_the_gpu_by_name(monkeypatch):
    cuda = torch.device('cuda')
    for name, peak in (('NVIDIA H100 80GB HBM3', 989.4), ('NVIDIA H100 PCIe', 756.5), ('NVIDIA H200', 989.4),
                       ('NVIDIA H200 NVL', 835.5), ('NVIDIA A100-SXM4-80GB', 312.0), ('NVIDIA GeForce RTX 4090', None)):
        monkeypatch.setattr(torch.cuda, 'get_device_name', lambda device=None, name=name: name)
        assert peak_tflops(cuda) == peak, name
    assert peak_tflops(cuda, 500.0) == 500.0 and peak_tflops(torch.device('cpu')) is None


def test_encode_mfu_counts_the_runtime_flops(one_thread):
    rows = bench_encode_mfu.main(['--quick', '--settings', 'fp32', 'bf16', '--peak_tflops', '1'])
    assert [r['setting'] for r in rows] == ['fp32', 'bf16']
    assert rows[0]['max_abs_deviation'] == 0 and rows[1]['max_abs_deviation'] < 0.2 * rows[1]['feature_std']
    assert all(r['mfu'] == pytest.approx(r['tflops']) and r['clips_per_s'] > 0 for r in rows)


def test_the_published_bench_needs_the_prepared_folder(tmp_path):
    done = subprocess.run([sys.executable, '-m', 'bench.bench_published', '--quick', '--published', str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f'error: the published implementation is not in {tmp_path} (needs m2d/m2d/models_mae.py and '
        'wheels/timm-0.4.12-py3-none-any.whl); make it with: bash bench/gpu_prepare.sh PUBLISHED_DIR']


def test_loss_curves_of_fast_and_two_published_seeds(tmp_path):
    data = make_lms_dataset(tmp_path / 'data', vis=0)
    flags = ['--model', 'm2d_vit_tiny', '--depth', '1', '--decoder_depth', '1', '--input_size', '80x96',
             '--batch_size', '8', '--epochs', '2', '--warmup_epochs', '1', '--device', 'cpu', '--threads', '1',
             '--num_workers', '0', '--data_path', str(data), '--dataset', str(data / 'files.csv'),
             '--norm_stats', '[-5, 2]']
    result = loss_curves.main(['--out', str(tmp_path / 'curves'), '--smooth', '2', *flags])
    assert result['steps'] == {'published-seed0': 4, 'published-seed1': 4, 'fast-seed0': 4}
    assert result['seed_noise'] > 0 and isinstance(result['within_seed_noise'], bool)
    assert (tmp_path / 'curves' / 'loss_curves.png').stat().st_size > 10_000
    assert json.loads((tmp_path / 'curves' / 'loss_curves.json').read_text())['fast_gap'] == result['fast_gap']
    assert 'precision torch.bfloat16' in (tmp_path / 'curves' / 'runs' / 'fast-seed0' / 'console.txt').read_text()


def test_the_gpu_session_writes_its_outputs_stage_by_stage(tmp_path):
    out, work = tmp_path / 'out', tmp_path / 'work'
    done = subprocess.run([sys.executable, '-m', 'bench.gpu_session', '--cpu-smoke', '--stages', 'env', 'data',
                           '--out', str(out), '--work', str(work)], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:]
    summary = (out / 'summary.md').read_text()
    assert '| env | ok |' in summary and '| data | ok |' in summary
    assert len((work / 'data' / 'files.csv').read_text().splitlines()) == 1 + 24
    with tarfile.open(out / 'details.tar.gz') as tar:
        assert 'norm_stats.json' in tar.getnames()
    assert (out / 'session.log').stat().st_size > 0


def test_the_gpu_session_skips_the_stages_it_has_no_time_for(tmp_path):
    done = subprocess.run([sys.executable, '-m', 'bench.gpu_session', '--cpu-smoke', '--stages', 'env', 'data',
                           '--deadline', '30', '--out', str(tmp_path / 'out'), '--work', str(tmp_path / 'work')],
                          cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 1
    summary = (tmp_path / 'out' / 'summary.md').read_text()
    assert '| env | skipped (no time left) |' in summary and '| data | skipped (no time left) |' in summary
