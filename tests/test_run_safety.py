"""A checkpoint never chooses what runs, a run folder belongs to one run, and logs survive faults.

Checkpoints are shared between people: what a file stores is data. A resumed run takes from it only the
model and the optimisation; values are checked as flags are; a run never overwrites another's results.
"""
import argparse
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_checkpoint
from test_pretrain import tiny_argv
from test_wav_to_lms import _write

from m2d.checkpoint import load_checkpoint
from m2d.cli.train import cli
from m2d.errors import CheckpointError
from m2d.runtime.runtime import RuntimeM2D
from m2d.train.run_folder import run_lock

REPO = Path(__file__).resolve().parents[1]


def argv(data: Path, out: Path, *extra: str) -> list[str]:
    """A tiny M2D run (test_pretrain's, with one block each and 80x64 crops): 16 files, batch 8, 2 steps per
    epoch, 2 epochs, a checkpoint every epoch."""
    return tiny_argv(data, out, '--depth', '1', '--decoder_depth', '1', '--input_size', '80x64', *extra)


def fake_scripts(folder: Path) -> Path:
    """quick_eval.sh / all_eval.sh that only record that they ran, in folder/ran.txt."""
    folder.mkdir()
    for name in ('quick_eval.sh', 'all_eval.sh'):
        (folder / name).write_text(f'echo {name} >> "{folder}/ran.txt"\n')
    return folder


def crafted(checkpoint: Path, dest: Path, **args) -> Path:
    """A copy of a training checkpoint whose stored args are changed (weights-only loadable, as shared).
    Crafted norm_stats replace the ones stored with the weights too (older files keep them in args only)."""
    ckpt = load_checkpoint(checkpoint)
    for key, value in args.items():
        setattr(ckpt['args'], key, value)
    if 'norm_stats' in args:
        del ckpt['model']['norm_stats']
    dest.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, dest)
    return dest


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith('error: ') and 'Traceback' not in err, err
    return err


# ----- 1. what a resume takes from the file ------------------------------------------------------

def test_resume_takes_the_model_and_optimisation_never_programs_or_paths(lms_data, tmp_path, capsys):
    first = tmp_path / 'first'
    assert cli(argv=argv(lms_data, first, '--stop_at', '1', '--mask_ratio', '0.6', '--blr', '1e-3')) == 0
    evil = fake_scripts(tmp_path / 'evil')
    elsewhere = tmp_path / 'elsewhere'
    shared = crafted(first / 'checkpoint-1.pth', tmp_path / 'shared' / 'checkpoint-1.pth', eval_scripts=str(evil),
                     eval_after=0, log_dir=str(elsewhere), data_path=str(tmp_path / 'nothing'), device='cuda',
                     num_workers=7, compile=True, output_dir=str(elsewhere))
    good = fake_scripts(tmp_path / 'good')
    capsys.readouterr()
    # Only --resume, --epochs and this machine's data and scripts: the model and the schedule come from the file.
    assert cli(argv=['--resume', str(shared), '--epochs', '2', '--data_path', str(lms_data), '--dataset',
                     str(lms_data / 'files.csv'), '--eval_scripts', str(good), '--threads', '1']) == 0
    out = capsys.readouterr().out
    assert not (evil / 'ran.txt').exists() and not elsewhere.exists()
    assert (good / 'ran.txt').read_text().split() == ['all_eval.sh']  # eval_after stays 100: no quick_eval.sh
    resumed = load_checkpoint(shared.parent / 'checkpoint-2.pth')['args']
    assert (resumed.model, resumed.depth, resumed.input_size, resumed.mask_ratio, resumed.blr) == \
        ('m2d_vit_tiny', 1, [80, 64], 0.6, 1e-3)
    assert (resumed.device, resumed.num_workers, resumed.compile, resumed.log_dir) == ('auto', 0, False, '')
    assert list(shared.parent.glob('events.out.tfevents.*'))  # TensorBoard in the run folder
    note = next(line for line in out.splitlines() if line.startswith('Note: not taken from'))
    assert f"eval_scripts='{good}' (stored '{evil}')" in note and "device='auto' (stored 'cuda')" in note


def resume_argv(data: Path, *extra: str) -> list[str]:
    """What a user gives to resume: this machine's data and scripts; the rest comes from the checkpoint."""
    return ['--data_path', str(data), '--dataset', str(data / 'files.csv'), '--eval_scripts', str(data / 'no_scripts'),
            '--threads', '1', '--device', 'cpu', *extra]


@pytest.mark.parametrize('key, value, says', [
    ('norm_stats', [float('nan'), float('nan')], 'norm_stats must be two finite numbers'),
    ('norm_stats', [0.0, 0.0], 'norm_stats must be two finite numbers'),
    ('norm_stats', 'abc', 'stored norm_stats is not valid'),
    ('norm_stats', [1.0], 'norm_stats must be two finite numbers'),
    ('input_size', [80, 160000000], 'patches, more than the 16384 a model may have'),
    ('mask_ratio', 7.0, 'stored mask_ratio must be between 0 and 1'),
    ('epochs', 'many', 'stored epochs is not valid'),
    ('model', 'os.system', 'model must be one of'),
])
def test_stored_settings_are_checked_like_flags(lms_data, tmp_path, capsys, key, value, says):
    first = tmp_path / 'first'
    assert cli(argv=argv(lms_data, first, '--stop_at', '1')) == 0
    bad = crafted(first / 'checkpoint-1.pth', tmp_path / 'bad' / 'checkpoint-1.pth', **{key: value})
    capsys.readouterr()
    assert cli(argv=['--resume', str(bad), *resume_argv(lms_data)]) == 2
    assert says in one_line_error(capsys)
    assert sorted(p.name for p in bad.parent.iterdir()) == ['checkpoint-1.pth']  # nothing written
    if key in ('norm_stats', 'input_size', 'model'):  # what --init_from takes
        assert cli(argv=['--init_from', str(bad), *resume_argv(lms_data), '--output_dir', str(tmp_path / 'new')]) == 2
        assert says in one_line_error(capsys) and not (tmp_path / 'new').exists()


def test_weights_and_stats_from_files_are_checked_before_use(tmp_path):
    """Non-finite weights, broken stored norm_stats and sizes that would allocate gigabytes are refused at
    load, on every path that reads weights (here RuntimeM2D; training's paths share extract_state_dict)."""
    path = make_checkpoint(tmp_path / 'nan')
    ckpt = torch.load(path)
    ckpt['model']['blocks.0.mlp.fc1.weight'][3, 4] = float('nan')
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match=r'holds NaN or inf values in 1 tensors \(blocks.0.mlp.fc1.weight\)'):
        RuntimeM2D(weight_file=str(path))

    for stats in ([float('nan'), 1.0], [0.0, 0.0], [1.0]):
        path = make_checkpoint(tmp_path / f'stats{len(stats)}{stats[-1]}')
        ckpt = torch.load(path)
        ckpt['model']['norm_stats'] = torch.tensor(stats)
        torch.save(ckpt, path)
        with pytest.raises(CheckpointError, match="stored norm_stats must be two finite numbers"):
            RuntimeM2D(weight_file=str(path))

    path = make_checkpoint(tmp_path / 'huge')
    ckpt = torch.load(path)
    ckpt['args'] = argparse.Namespace(model='m2d_vit_tiny', input_size=[80, 160000000],
                                                    patch_size=[16, 16])
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match='more than the 16384 a model may have'):
        RuntimeM2D(weight_file=str(path))


def test_encode_refuses_a_checkpoint_with_non_finite_weights(tmp_path):
    path = make_checkpoint(tmp_path)
    ckpt = torch.load(path)
    ckpt['model']['norm.weight'][0] = float('inf')
    torch.save(ckpt, path)
    _write(tmp_path / 'audio' / 'a.wav', 16000, 1.0, 1)
    proc = subprocess.run([sys.executable, '-m', 'm2d', 'encode', str(path), str(tmp_path / 'audio'),
                           str(tmp_path / 'emb')], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and 'holds NaN or inf values' in proc.stderr
    assert not list(tmp_path.glob('emb/**/*.npy'))


# ----- 2. a run folder belongs to one run ----------------------------------------------------------

def test_a_new_run_never_overwrites_another_runs_checkpoints(lms_data, tmp_path, capsys):
    out = tmp_path / 'run'
    assert cli(argv=argv(lms_data, out)) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != '.lock'}
    capsys.readouterr()
    assert cli(argv=argv(lms_data, out, '--seed', '1')) == 2
    err = one_line_error(capsys)
    assert 'already holds checkpoints of another run (checkpoint-1.pth, checkpoint-2.pth)' in err
    assert f'--resume {out / "checkpoint-2.pth"}' in err and '--overwrite' in err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != '.lock'} == before

    # --overwrite starts over, with the earlier run's files moved aside, not deleted.
    assert cli(argv=argv(lms_data, out, '--seed', '1', '--overwrite')) == 0
    (aside,) = out.glob('previous-*')
    assert {p.name: p.read_bytes() for p in aside.iterdir() if p.is_file()} == before
    assert load_checkpoint(out / 'checkpoint-2.pth')['args'].seed == 1
    assert [json.loads(line)['epoch'] for line in (out / 'log.txt').read_text().splitlines()] == [1, 2]
    assert f'moved the earlier files into {aside}' in capsys.readouterr().out


def test_a_resume_keeps_to_its_own_folder_and_never_drops_later_checkpoints(lms_data, tmp_path, capsys):
    a, b = tmp_path / 'a', tmp_path / 'b'
    assert cli(argv=argv(lms_data, a)) == 0 and cli(argv=argv(lms_data, b, '--seed', '1')) == 0
    later = (a / 'checkpoint-2.pth').read_bytes()
    capsys.readouterr()
    assert cli(argv=['--resume', str(a / 'checkpoint-1.pth'), *resume_argv(lms_data)]) == 2
    assert 'holds later checkpoints than checkpoint-1.pth (checkpoint-2.pth)' in one_line_error(capsys)
    assert cli(argv=['--resume', str(a / 'checkpoint-1.pth'), *resume_argv(lms_data, '--output_dir', str(b))]) == 2
    assert f'{b} holds checkpoints of another run' in one_line_error(capsys)
    assert (a / 'checkpoint-2.pth').read_bytes() == later
    # --overwrite: the later checkpoint is moved aside, and the run goes on from epoch 1.
    assert cli(argv=['--resume', str(a / 'checkpoint-1.pth'), *resume_argv(lms_data, '--overwrite')]) == 0
    (aside,) = a.glob('previous-*')
    assert (aside / 'checkpoint-2.pth').read_bytes() == later and (a / 'checkpoint-2.pth').is_file()


def test_a_folder_in_use_is_refused_and_a_stale_lock_is_taken_over(lms_data, tmp_path, capsys):
    out = tmp_path / 'run'
    out.mkdir()
    with run_lock(out, print_fn=lambda _: None):  # another run holds the folder
        assert cli(argv=argv(lms_data, out)) == 2
        err = one_line_error(capsys)
        assert f'{out} is in use by another run (pid {os.getpid()} on ' in err and 'another --output_dir' in err
    assert not list(out.glob('checkpoint-*'))
    # A run killed with SIGKILL leaves its lock file behind, unlocked: the next run takes it over.
    (out / '.lock').write_text(json.dumps({'pid': 999999, 'host': 'gone', 'started': 'yesterday'}))
    assert cli(argv=argv(lms_data, out)) == 0
    assert 'took over the lock of a run that ended without releasing it (pid 999999 on gone' in capsys.readouterr().out
    assert (out / '.lock').read_text() == ''  # released cleanly


def test_two_runs_started_into_one_folder_at_once(lms_data, tmp_path):
    """One trains; the other is refused (in use, or the first's checkpoints exist); nothing is mixed."""
    out = tmp_path / 'run'
    cmd = [sys.executable, str(REPO / 'train_audio.py'), *argv(lms_data, out, '--epochs', '3')]
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    procs = [subprocess.Popen([*cmd, '--seed', str(seed)], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for seed in (0, 1)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert sorted(rc for rc, _ in results) == [0, 2], results
    winner = [seed for seed, (rc, _) in enumerate(results) if rc == 0][0]
    refused = next(err for rc, err in results if rc == 2)
    assert 'is in use by another run' in refused or 'already holds checkpoints of another run' in refused
    assert {load_checkpoint(out / f'checkpoint-{e}.pth')['args'].seed for e in (1, 2, 3)} == {winner}
    assert [json.loads(line)['epoch'] for line in (out / 'log.txt').read_text().splitlines()] == [1, 2, 3]


# ----- 6. logs after faults ---------------------------------------------------------------------

def _run_until(cmd: list[str], cwd: Path, marker: str) -> None:
    """Start a training command and kill it with SIGKILL once it prints a line starting with `marker`."""
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONUNBUFFERED': '1'})
    try:
        for line in proc.stdout:
            if line.startswith(marker):
                break
        else:
            pytest.fail(f'the run ended before printing {marker!r}')
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)


def test_logs_show_each_epoch_and_step_once_after_kills_and_resumes(lms_data, tmp_path):
    out = tmp_path / 'run'
    cmd = [sys.executable, str(REPO / 'train_audio.py'), *argv(lms_data, out, '--epochs', '6', '--save_freq', '2')]
    # Killed after logging epoch 1 but before its first checkpoint; then started afresh, twice.
    for _ in range(2):
        _run_until(cmd, tmp_path, 'Epoch [2/6] step [1/2]')
    assert not list(out.glob('checkpoint-*'))
    # Killed after logging epochs 3 and 4 past checkpoint-2, then resumed; then killed again past checkpoint-4.
    _run_until(cmd, tmp_path, 'Epoch [4/6] step [2/2]')
    resume = [sys.executable, str(REPO / 'train_audio.py'), '--resume', str(out / 'checkpoint-2.pth'),
              *resume_argv(lms_data, '--print_freq', '1')]
    _run_until(resume, tmp_path, 'Epoch [6/6] step [1/2]')
    resume[resume.index('--resume') + 1] = str(out / 'checkpoint-4.pth')
    subprocess.run(resume, cwd=tmp_path, check=True, capture_output=True, timeout=300,
                   env={**os.environ, 'OMP_NUM_THREADS': '1'})

    assert [json.loads(line)['epoch'] for line in (out / 'log.txt').read_text().splitlines()] == [1, 2, 3, 4, 5, 6]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(out))
    events.Reload()
    assert len(list(out.glob('events.out.tfevents.*'))) == 5
    for tag in ('train_loss', 'lr', 'ema_decay'):
        assert [e.step for e in events.Scalars(tag)] == list(range(12)), tag


# ----- 5. flags and schedules ----------------------------------------------------------------------

def test_bad_numbers_are_one_line_errors(lms_data, tmp_path, capsys):
    for flag, value, says in (('--threads', '-1', '--threads must be a whole number of 0 or more, got -1'),
                              ('--clip_grad', 'nan', '--clip_grad must be a finite number of 0 or more'),
                              ('--warmup_epochs', '-2', '--warmup_epochs must be a finite number of 0 or more')):
        assert cli(argv=argv(lms_data, tmp_path / 'run', flag, value)) == 2
        assert says in one_line_error(capsys)
    assert not (tmp_path / 'run').exists()


def test_init_from_scales_a_warm_up_longer_than_the_run(lms_data, tmp_path, capsys):
    """--init_from ... --epochs 2 would keep the published 20 warm-up epochs and never reach the lr: it gets
    the published share (20 of 300 epochs) instead; a given --warmup_epochs stays, with a note."""
    assert cli(argv=argv(lms_data, tmp_path / 'first', '--epochs', '1')) == 0
    further = ['--init_from', str(tmp_path / 'first' / 'checkpoint-1.pth'), *resume_argv(lms_data), '--epochs', '2']
    assert cli(argv=[*further, '--output_dir', str(tmp_path / 'a')]) == 0
    assert load_checkpoint(tmp_path / 'a' / 'checkpoint-2.pth')['args'].warmup_epochs == pytest.approx(2 * 20 / 300)
    capsys.readouterr()
    assert cli(argv=[*further, '--output_dir', str(tmp_path / 'b'), '--warmup_epochs', '5']) == 0
    assert 'Note: the lr warm-up (5 epochs) spans the whole run (2 epochs)' in capsys.readouterr().out
