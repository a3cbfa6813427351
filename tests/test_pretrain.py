"""Pre-training loop: schedules, optimizer groups, outputs, checkpoints, resume, failures, hooks, scripts."""
import datetime
import errno
import io
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FullDisk, make_checkpoint, make_lms_dataset, press_ctrl_c, start_as_in_a_terminal

from m2d.checkpoint import load_checkpoint, save_checkpoint
from m2d.cli.train import cli
from m2d.model.vit import M2DViT
from m2d.runtime.runtime import RuntimeM2D
from m2d.train.config import build_model, get_args_parser
from m2d.train.engine import Precision, Schedule, optimizer_step, train_one_epoch
from m2d.train.main import build_optimizer, main
from util.schedules import cosine_lr, ema_decay, scaled_lr

REPO = Path(__file__).resolve().parents[1]


def tiny_argv(data: Path, out, *extra: str, mae: bool = False) -> list[str]:
    """16 files, batch 8: 2 steps per epoch of a 2-block model on 80x96 crops."""
    model = ['--model', 'msm_mae_vit_tiny'] if mae else ['--model', 'm2d_vit_tiny', '--decoder_depth', '2']
    return [*model, '--depth', '2', '--input_size', '80x96', '--batch_size', '8', '--epochs', '2',
            '--warmup_epochs', '1', '--device', 'cpu', '--num_workers', '0', '--data_path', str(data),
            '--dataset', str(data / 'files.csv'), '--output_dir', str(out), '--print_freq', '1',
            '--save_freq', '1', '--eval_scripts', str(data / 'no_scripts'), '--threads', '1', *extra]


def drop_flags(argv: list[str], *flags: str) -> list[str]:
    """argv without these flags and their values."""
    out, skip = [], False
    for a in argv:
        if skip or a in flags:
            skip = a in flags
            continue
        out.append(a)
    return out


def run(argv: list[str], mae: bool = False):
    return main(get_args_parser(mae).parse_args(argv))


# ----- schedules and optimizer ---------------------------------------------------------------------

def test_lr_schedule():
    assert scaled_lr(3e-4, 2048) == pytest.approx(2.4e-3)
    assert cosine_lr(0, 1.0, 0.1, 2, 10) == 0.0
    assert cosine_lr(1, 1.0, 0.1, 2, 10) == pytest.approx(0.5)
    assert cosine_lr(2, 1.0, 0.1, 2, 10) == pytest.approx(1.0)
    assert cosine_lr(6, 1.0, 0.1, 2, 10) == pytest.approx(0.55)  # half way down the half cosine
    assert cosine_lr(10, 1.0, 0.1, 2, 10) == pytest.approx(0.1)
    s = Schedule(1.0, 0.0, 1, 4, iters_per_epoch=4, ema_decay_init=0.99995, ema_decay_final=0.99999)
    assert s.lr_at(0, 2) == pytest.approx(0.5)  # per iteration, not per epoch
    assert s.lr_at(2, 2) == pytest.approx(0.5 * (1 + math.cos(math.pi * 1.5 / 3)))


def test_ema_schedule():
    assert ema_decay(0, 11, 0.99995, 0.99999) == 0.99995
    assert ema_decay(5, 11, 0.99995, 0.99999) == pytest.approx(0.99997)
    assert ema_decay(10, 11, 0.99995, 0.99999) == pytest.approx(0.99999)
    s = Schedule(1.0, 0.0, 1, 3, iters_per_epoch=5, ema_decay_init=0.5, ema_decay_final=1.0)
    assert s.ema_at(2, 4) == pytest.approx(1.0) and s.ema_at(1, 2) == pytest.approx(0.5 + 0.5 * 7 / 14)


def test_optimizer_groups_follow_timms_no_decay_rule():
    args = get_args_parser().parse_args(['--model', 'm2d_vit_tiny', '--depth', '2', '--decoder_depth', '2',
                                         '--lr', '1e-3'])
    model = build_model(args)
    opt = build_optimizer(args, model, torch.device('cpu'))
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults['betas'] == (0.9, 0.95)
    names = {id(p): n for n, p in model.named_parameters()}
    by_decay = {g['weight_decay']: [names[id(p)] for p in g['params']] for g in opt.param_groups}
    assert set(by_decay) == {0.0, 0.05}
    assert all(n.endswith('.bias') or model.get_parameter(n).ndim == 1 for n in by_decay[0.0])
    assert 'blocks.0.norm1.weight' in by_decay[0.0] and 'blocks.0.attn.qkv.bias' in by_decay[0.0]
    assert 'blocks.0.attn.qkv.weight' in by_decay[0.05]
    assert not any(n.startswith(('target_', 'pos_embed', 'decoder_pos_embed')) for ns in by_decay.values() for n in ns)
    args.optim = 'sgd'
    assert isinstance(build_optimizer(args, model, torch.device('cpu')), torch.optim.SGD)


def test_gradient_clipping_is_applied():
    w = torch.nn.Parameter(torch.zeros(4))
    opt = torch.optim.SGD([w], lr=1.0)
    w.grad = torch.full((4,), 10.0)
    optimizer_step(opt, torch.amp.GradScaler('cpu', enabled=False), [w], clip_grad=3.0)
    assert w.norm().item() == pytest.approx(3.0) and w.grad is None
    # Off by default, as in the published runs (their --clip_grad 3.0 never reached the loss scaler).
    assert get_args_parser().parse_args([]).clip_grad == 0
    w.grad = torch.full((4,), 10.0)
    optimizer_step(opt, torch.amp.GradScaler('cpu', enabled=False), [w], clip_grad=0)
    assert w.norm().item() == pytest.approx(3.0 + 20.0)


def test_mixed_precision_follows_the_published_recipe(one_thread):
    """--amp: fp16 with a dynamic loss scaler on CUDA by default (published), fp32 on the CPU; with fp16 a
    step whose gradients overflow is skipped and the scale halves, while the EMA update of the target runs."""
    cpu, cuda = torch.device('cpu'), torch.device('cuda')
    assert Precision.from_flag(None, cpu).dtype is None and Precision.from_flag(None, cuda).dtype == torch.float16
    assert Precision.from_flag(None, cuda).use_scaler and not Precision.from_flag('bf16', cuda).use_scaler
    assert get_args_parser().parse_args(['--amp', 'bf16']).amp == 'bf16'

    torch.manual_seed(0)
    model = M2DViT(img_size=[80, 64], embed_dim=64, depth=1, num_heads=2, decoder_embed_dim=32, decoder_depth=1,
                   decoder_num_heads=2, norm_pix_loss=True)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    schedule = Schedule(1e-3, 0.0, 0, 1, iters_per_epoch=1, ema_decay_init=0.9, ema_decay_final=0.9)
    batch = [torch.randn(4, 1, 80, 64)]

    def step(scaler):
        before = {k: v.clone() for k, v in model.state_dict().items()}
        train_one_epoch(model, model, batch, optimizer, scaler, Precision.from_flag('fp16', cpu), schedule, 0, cpu,
                        0.7, print_fn=lambda _: None)
        changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
        return {k.split('.')[0] for k in changed}

    huge = torch.amp.GradScaler('cpu', init_scale=2.0 ** 40)  # fp16 gradients overflow at this scale
    assert step(huge) == {'target_blocks'} and huge.get_scale() == 2.0 ** 39  # (target_norm equals norm still)
    usual = torch.amp.GradScaler('cpu')
    assert {'blocks', 'decoder_pred', 'target_blocks'} <= step(usual) and usual.get_scale() == 2.0 ** 16


# ----- a whole run ---------------------------------------------------------------------------------

def fake_eval_scripts(folder: Path) -> Path:
    folder.mkdir()
    for name in ('quick_eval.sh', 'all_eval.sh'):
        (folder / name).write_text(f'echo "{name} $1 $M2D_PYTHON" >> "{folder}/calls.txt"\necho hello from {name}\n')
    return folder


def test_run_outputs_checkpoints_and_hooks(lms_data, tmp_path, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)
    scripts = fake_eval_scripts(tmp_path / 'scripts')
    result = run(tiny_argv(lms_data, '', '--eval_after', '2', '--eval_scripts', str(scripts), '--print_freq', '2'))
    out = result.output_dir
    assert re.fullmatch(rf'm2d_vit_tiny-80x96p16x16-{datetime.date.today():%y%m%d}-mr7', out.name)
    assert sorted(p.name for p in out.glob('checkpoint-*.pth')) == ['checkpoint-1.pth', 'checkpoint-2.pth']

    ckpt = load_checkpoint(out / 'checkpoint-2.pth')
    assert {'model', 'optimizer', 'epoch', 'scaler', 'args', 'rng'} <= set(ckpt)
    assert ckpt['epoch'] == 2 and ckpt['args'].model == 'm2d_vit_tiny' and len(ckpt['rng']) == 1
    assert any(k.startswith('target_blocks.') for k in ckpt['model'])
    assert ckpt['args'].eff_batch_size == 8 and ckpt['args'].lr == pytest.approx(3e-4 * 8 / 256)

    rt = RuntimeM2D(weight_file=str((out / 'checkpoint-2.pth').resolve()))  # the folder name is enough
    assert len(rt.backbone.blocks) == 2 and len(rt.backbone.decoder_blocks) == 2
    assert rt.encode(torch.rand(2, 16000) * 2 - 1).shape == (2, 7, 192 * 5)

    logs = [json.loads(line) for line in (out / 'log.txt').read_text().splitlines()]
    assert [e['epoch'] for e in logs] == [1, 2] and all(math.isfinite(e['train_loss']) for e in logs)
    assert {'train_lr', 'train_ema_decay', 'train_samples_per_s'} <= set(logs[0])

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(out))
    events.Reload()
    assert {'train_loss', 'lr', 'ema_decay'} <= set(events.Tags()['scalars'])
    assert len(events.Scalars('train_loss')) == 4  # every step, whatever --print_freq
    assert [e.step for e in events.Scalars('lr')] == [0, 1, 2, 3]

    console = (out / 'console.txt').read_text()
    assert 'Epoch [2/2] step [2/2]' in console and 'samples/s' in console and 'ema 0.99999' in console
    assert 'Epoch [1/2] step [1/2]' not in console  # a progress line every --print_freq steps
    assert re.search(r'step \[2/2\].*elapsed \d+:\d\d:\d\d  ETA 0:00:00', console)
    assert (out / 'loss.png').stat().st_size > 1000
    assert 'hello from all_eval.sh' in console
    assert (out / 'vis-1.png').stat().st_size > 1000 and (out / 'vis-2.png').is_file()

    # quick_eval.sh from epoch --eval_after on (in the background), all_eval.sh at the end.
    assert len(result.eval_processes) == 1 and result.eval_processes[0].wait(timeout=30) == 0
    calls = (scripts / 'calls.txt').read_text().splitlines()
    ckpt2 = str((out / 'checkpoint-2.pth').resolve())
    assert sorted(calls) == sorted([f'quick_eval.sh {ckpt2} {sys.executable}', f'all_eval.sh {ckpt2} {sys.executable}'])
    assert 'hello from quick_eval.sh' in (out / 'quick_eval-2.log').read_text()


def test_missing_eval_scripts_are_reported(lms_data, tmp_path, capsys, one_thread):
    result = run(tiny_argv(lms_data, tmp_path / 'run', '--epochs', '1', '--eval_after', '0'))
    assert result.eval_processes == []
    out = capsys.readouterr().out
    assert 'quick_eval.sh not found' in out and 'all_eval.sh not found' in out


def test_resume_is_bitwise_identical(lms_data, tmp_path, one_thread):
    straight = run(tiny_argv(lms_data, tmp_path / 'straight')).output_dir
    stopped = run(tiny_argv(lms_data, tmp_path / 'stopped', '--stop_at', '1')).output_dir
    assert not (stopped / 'checkpoint-2.pth').exists()
    run(tiny_argv(lms_data, '', '--resume', str(stopped / 'checkpoint-1.pth')))  # continues in the same folder
    a, b = load_checkpoint(straight / 'checkpoint-2.pth'), load_checkpoint(stopped / 'checkpoint-2.pth')
    assert a['model'].keys() == b['model'].keys()
    for k in a['model']:
        assert torch.equal(a['model'][k], b['model'][k]), k
    for sa, sb in zip(a['optimizer']['state'].values(), b['optimizer']['state'].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert 'Resumed from' in (stopped / 'console.txt').read_text()


def test_interrupted_checkpoint_write_keeps_the_old_file(tmp_path, monkeypatch):
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters())
    scaler = torch.amp.GradScaler('cpu', enabled=False)
    path = tmp_path / 'checkpoint-1.pth'
    save_checkpoint(path, model, opt, scaler, 1, None, [])
    before = path.read_bytes()

    real_save = torch.save

    def crash_midway(obj, f, *args, **kwargs):
        f.write(b'partial data')
        raise OSError('disk full')

    monkeypatch.setattr(torch, 'save', crash_midway)
    with torch.no_grad():
        model.weight.add_(1.0)
    with pytest.raises(OSError, match='disk full'):
        save_checkpoint(path, model, opt, scaler, 2, None, [])
    monkeypatch.setattr(torch, 'save', real_save)
    assert path.read_bytes() == before and load_checkpoint(path)['epoch'] == 1
    assert [p.name for p in tmp_path.iterdir()] == ['checkpoint-1.pth']  # no temporary file left


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(lms_data, tmp_path, monkeypatch, capsys, one_thread):
    real_loss, calls = M2DViT.forward_loss, []

    def diverge_in_epoch_2(self, target, pred):
        loss = real_loss(self, target, pred)
        if self.training:  # not the picture at the checkpoint
            calls.append(1)
            if len(calls) > 2:
                return loss * float('nan')
        return loss

    monkeypatch.setattr(M2DViT, 'forward_loss', diverge_in_epoch_2)
    out = tmp_path / 'run'
    assert cli(argv=tiny_argv(lms_data, out)) == 1
    assert 'loss is nan at epoch 2, step 1/2' in capsys.readouterr().err
    assert 'ERROR: loss is nan' in (out / 'console.txt').read_text()
    assert not (out / 'checkpoint-2.pth').exists()
    assert load_checkpoint(out / 'checkpoint-1.pth')['epoch'] == 1
    assert len((out / 'log.txt').read_text().splitlines()) == 1


def test_bad_input_gives_a_clear_error(lms_data, tmp_path, monkeypatch, capsys):
    (lms_data / 'lms' / 'clip003.npy').unlink()
    assert cli(argv=tiny_argv(lms_data, tmp_path / 'run')) == 2
    err = capsys.readouterr().err
    assert 'clip003.npy: missing' in err and '--skip_missing' in err
    assert not list((tmp_path / 'run').glob('checkpoint-*'))

    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    argv = tiny_argv(lms_data, tmp_path / 'run')
    argv[argv.index('--device') + 1] = 'cuda'
    assert cli(argv=argv) == 2
    assert 'CUDA is not available' in capsys.readouterr().err


def test_skip_missing_trains_without_the_missing_file(lms_data, tmp_path, capsys, one_thread):
    (lms_data / 'lms' / 'clip003.npy').unlink()
    result = run(tiny_argv(lms_data, tmp_path / 'run', '--epochs', '1', '--skip_missing', '--batch_size', '5'))
    assert (result.output_dir / 'checkpoint-1.pth').is_file()
    out = capsys.readouterr().out
    assert 'WARNING: skipping 1 of 16 files' in out and 'Dataset: 15 files' in out and 'step [3/3]' in out


def test_msm_mae_script(tmp_path):
    data = make_lms_dataset(tmp_path / 'data', vis=1)
    argv = tiny_argv(data, '', '--epochs', '1', mae=True)
    proc = subprocess.run([sys.executable, str(REPO / 'mae_train_audio.py'), *argv], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, env={'OMP_NUM_THREADS': '1', 'PATH': ''})
    assert proc.returncode == 0, proc.stderr
    (out,) = tmp_path.glob('msm_mae_vit_tiny-80x96p16x16-*-mr75')
    ckpt = load_checkpoint(out / 'checkpoint-1.pth')
    assert ckpt['model']['decoder_pred.weight'].shape == (256, 96)
    assert not any(k.startswith('target') for k in ckpt['model']) and ckpt['args'].norm_pix_loss is False
    assert 'ema' not in (out / 'console.txt').read_text().split('Epoch [1/1]')[1]
    assert (out / 'vis-1.png').is_file()


def test_gradient_accumulation_and_run_folder_suffix(lms_data, tmp_path, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)
    argv = tiny_argv(lms_data, '', '--epochs', '1', '--batch_size', '4', '--accum_iter', '2')
    first = run(argv).output_dir
    second = run(argv).output_dir  # never overwrites an earlier run's checkpoints
    assert second.name == first.name + '-2'
    ckpt = load_checkpoint(second / 'checkpoint-1.pth')
    assert ckpt['args'].eff_batch_size == 8 and ckpt['args'].lr == pytest.approx(3e-4 * 8 / 256)
    # 4 batches per epoch, one optimizer update per 2 of them.
    assert {int(s['step']) for s in ckpt['optimizer']['state'].values()} == {2}
    assert 'step [4/4]' in (second / 'console.txt').read_text()


def test_resume_from_weights_only(lms_data, tmp_path, capsys, one_thread):
    weights = make_checkpoint(tmp_path, input_size=(80, 96), wrap=False, name='weights.pth')
    result = run(tiny_argv(lms_data, tmp_path / 'run', '--epochs', '1', '--resume', str(weights)))
    assert 'holds weights only; the optimizer starts afresh at epoch 0' in capsys.readouterr().out
    assert load_checkpoint(result.output_dir / 'checkpoint-1.pth')['epoch'] == 1


# ----- bad inputs and faults: one-line errors, nothing lost, nothing left behind --------------------

def test_norm_stats_syntax_and_checks(capsys):
    for argv in (['--norm_stats', '[-7.1, 4.2]'], ['--norm_stats=-7.1,4.2'], ['--norm_stats', '-7.1', '4.2']):
        assert get_args_parser().parse_args(argv).norm_stats == [-7.1, 4.2]
    for bad in ('[nan, 4.2]', '[-7.1, inf]', '[-7.1, 0]', '[1, 2, 3]', 'x'):
        with pytest.raises(SystemExit) as done:
            get_args_parser().parse_args([f'--norm_stats={bad}'])
        assert done.value.code == 2
        assert 'two finite numbers "[mean, std]" with std > 0' in capsys.readouterr().err


def test_nan_file_fails_before_training_and_leaves_no_run_folder(lms_data, tmp_path, capsys):
    x = np.load(lms_data / 'lms' / 'clip005.npy')
    x[0, 0, 0] = np.nan
    np.save(lms_data / 'lms' / 'clip005.npy', x)
    out = tmp_path / 'runs' / 'run'
    assert cli(argv=tiny_argv(lms_data, out)) == 2
    err = capsys.readouterr().err
    assert 'clip005.npy: holds 1 NaN/inf values' in err and '--skip_missing' in err and 'Traceback' not in err
    assert not (tmp_path / 'runs').exists()  # the failed checks created nothing

    (lms_data / 'empty.csv').write_text('')
    argv = tiny_argv(lms_data, out)
    argv[argv.index('--dataset') + 1] = str(lms_data / 'empty.csv')
    assert cli(argv=argv) == 2
    assert f'{lms_data / "empty.csv"} is empty' in capsys.readouterr().err
    assert not (tmp_path / 'runs').exists()


def test_resume_of_a_missing_or_corrupt_checkpoint(lms_data, tmp_path, capsys):
    good = make_checkpoint(tmp_path, input_size=(80, 96))
    truncated, garbage = tmp_path / 'truncated.pth', tmp_path / 'garbage.pth'
    truncated.write_bytes(good.read_bytes()[:len(good.read_bytes()) // 2])
    garbage.write_bytes(b'this is not a checkpoint')
    for path in (truncated, garbage, tmp_path / 'missing.pth'):
        assert cli(argv=tiny_argv(lms_data, tmp_path / 'run', '--resume', str(path))) == 2
        err = capsys.readouterr().err
        assert err.startswith('error: --resume: ') and str(path) in err and len(err.splitlines()) == 1
    assert not (tmp_path / 'run').exists()


def test_unwritable_output_folder(lms_data, tmp_path, monkeypatch, capsys):
    (tmp_path / 'a_file').write_text('x')
    assert cli(argv=tiny_argv(lms_data, tmp_path / 'a_file' / 'run')) == 2
    assert f'cannot write {tmp_path / "a_file" / "run"}: {tmp_path / "a_file"} is a file, not a folder' in \
        capsys.readouterr().err
    locked = tmp_path / 'locked'
    locked.mkdir()
    if os.geteuid() != 0:
        locked.chmod(0o555)
    else:  # root writes through permission bits: make the write itself fail as a read-only folder would
        def refuse(*args, **kwargs):
            raise PermissionError(errno.EACCES, 'Permission denied')
        monkeypatch.setattr(tempfile, 'TemporaryFile', refuse)
    try:
        assert cli(argv=tiny_argv(lms_data, locked / 'run')) == 2
    finally:
        locked.chmod(0o755)
    err = capsys.readouterr().err
    assert f'cannot write {locked / "run"}: not writable (permission denied)' in err and 'Traceback' not in err


def test_disk_full_during_training_keeps_the_last_checkpoint(lms_data, tmp_path, monkeypatch, capsys, one_thread):
    """The disk fills up while checkpoint-2 is written: torch's writer fails inside (it wraps the ENOSPC in a
    RuntimeError); the run stops with one line naming the file, and checkpoint-1 stays."""
    real_fdopen = os.fdopen

    def fill_up_on_checkpoint_2(fd, mode='r', *args, **kwargs):
        if '.checkpoint-2.pth.' in os.readlink(f'/proc/self/fd/{fd}'):
            return FullDisk(io.FileIO(fd, mode))
        return real_fdopen(fd, mode, *args, **kwargs)

    monkeypatch.setattr(os, 'fdopen', fill_up_on_checkpoint_2)
    out = tmp_path / 'run'
    assert cli(argv=tiny_argv(lms_data, out)) == 2
    err = capsys.readouterr().err
    assert err == f'error: cannot write {out / "checkpoint-2.pth"}: no space left on device\n'
    assert load_checkpoint(out / 'checkpoint-1.pth')['epoch'] == 1 and not (out / 'checkpoint-2.pth').exists()
    assert not list(out.glob('.*.tmp'))
    assert 'ERROR: cannot write' in (out / 'console.txt').read_text()


def test_resume_after_a_hard_kill_cleans_up_and_rewrites_the_log(lms_data, tmp_path, one_thread):
    out = run(tiny_argv(lms_data, tmp_path / 'run', '--stop_at', '1')).output_dir
    # A save killed mid-write (SIGKILL: no cleanup runs) leaves its checkpoint-sized temporary file ...
    kill = ('import os, signal, sys; from util.atomic import open_atomic\n'
            'with open_atomic(sys.argv[1]) as f:\n'
            '    f.write(b"x" * 1000); f.flush(); os.kill(os.getpid(), signal.SIGKILL)')
    subprocess.run([sys.executable, '-c', kill, str(out / 'checkpoint-2.pth')], cwd=REPO, timeout=60)
    (leftover,) = out.glob('.checkpoint-2.pth.*.tmp')
    # ... after log.txt got epoch 2 (and a line cut short).
    with open(out / 'log.txt', 'a') as f:
        f.write(json.dumps({'epoch': 2, 'train_loss': 1.0}) + '\n{"epoch": 3, "tra')
    run(tiny_argv(lms_data, '', '--resume', str(out / 'checkpoint-1.pth')))
    assert not leftover.exists() and not list(out.glob('.*.tmp'))
    logs = [json.loads(line) for line in (out / 'log.txt').read_text().splitlines()]
    assert [e['epoch'] for e in logs] == [1, 2] and logs[1]['train_loss'] != 1.0


def test_ctrl_c_names_the_checkpoint_to_resume_from(lms_data, tmp_path):
    out = tmp_path / 'run'
    argv = tiny_argv(lms_data, out, '--epochs', '1000', '--print_freq', '100')
    proc = start_as_in_a_terminal([sys.executable, str(REPO / 'train_audio.py'), *argv], cwd=tmp_path,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  env={**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONUNBUFFERED': '1'})
    for line in proc.stdout:  # wait until a checkpoint exists, then press Ctrl-C
        if line.startswith('Saved'):
            break
    err = press_ctrl_c(proc, timeout=120)
    assert proc.returncode == 130, err
    assert len(err.splitlines()) == 1 and err.startswith('interrupted; in epoch ') and 'Traceback' not in err
    last = re.search(r'--resume (\S+) to continue', err).group(1)
    assert Path(last).parent == out and load_checkpoint(last)['epoch'] >= 1
    assert 'Interrupted: in epoch' in (out / 'console.txt').read_text()


def test_defaults_fit_a_small_dataset_on_a_laptop(lms_data, tmp_path, monkeypatch, capsys):
    """Without --batch_size, --num_workers, --device and --threads a run fits the data and the machine:
    the batch shrinks to the 16 files, no worker processes on the CPU, threads follow the idle cores."""
    import m2d.train.setup as pretrain
    monkeypatch.setattr(pretrain, 'idle_cores', lambda: 1)
    monkeypatch.delenv('OMP_NUM_THREADS', raising=False)
    before = torch.get_num_threads()
    try:
        argv = drop_flags(tiny_argv(lms_data, tmp_path / 'run'),
                          '--batch_size', '--num_workers', '--device', '--threads')
        assert '--batch_size' not in argv and '--device' not in argv
        result = run([*argv, '--epochs', '1', '--depth', '1'])
        args = load_checkpoint(result.last_checkpoint)['args']
        assert (args.batch_size, args.num_workers, args.device) == (16, 0, 'auto')
        out = capsys.readouterr().out
        assert 'Note: batch size 16 per process, as 16 files make no batch of 512' in out
        assert 'Batch 16 per process, 0 DataLoader workers, 1 torch threads per process (auto)' in out
        assert torch.get_num_threads() == 1
        with pytest.raises(pretrain.UsageError, match='16 files are too few for one batch of 512'):
            run([*argv, '--batch_size', '512', '--output_dir', str(tmp_path / 'run-b')])  # reachable, and explicit
        run([*argv, '--epochs', '1', '--depth', '1', '--threads', '2', '--output_dir', str(tmp_path / 'run2')])
        assert torch.get_num_threads() == 2
        # A user's OMP_NUM_THREADS wins over the idle-core count (torch's thread count stays as it set it).
        monkeypatch.setenv('OMP_NUM_THREADS', '2')
        monkeypatch.setattr(pretrain, 'idle_cores', lambda: pytest.fail('idle cores measured despite OMP_NUM_THREADS'))
        run([*argv, '--epochs', '1', '--depth', '1', '--output_dir', str(tmp_path / 'run3')])
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_idle_cores_are_the_usable_ones_not_kept_busy(monkeypatch):
    import util.cpu
    monkeypatch.setattr(util.cpu, 'usable_cores', lambda: 2)
    for busy, idle in ((1.9, 1), (0.2, 2), (7.0, 1), (1.4, 1), (1.6, 1), (0.6, 1), (0.4, 2)):
        monkeypatch.setattr(util.cpu, 'busy_cores', lambda: busy)
        assert util.cpu.idle_cores() == idle, busy


def test_busy_cores_sees_a_process_spinning_now():
    """Measured over the interval, not the last minute: a spinning child counts as (nearly) one busy core."""
    import util.cpu
    if util.cpu.cpu_times() is None:
        pytest.skip('needs /proc/stat (Linux)')
    spinner = subprocess.Popen([sys.executable, '-c', 'while True: pass'])
    try:
        time.sleep(0.3)
        assert util.cpu.busy_cores(0.5) >= 0.8
    finally:
        spinner.kill()
        spinner.wait()


def test_preset_fills_only_the_flags_not_given():
    from m2d.train.config import PRESETS, parse_args
    args = parse_args(['--preset', 'small', '--epochs', '3', '--blr', '2e-2'])
    assert (args.epochs, args.blr) == (3, 2e-2)
    small = PRESETS['small']
    assert all(getattr(args, k) == v for k, v in small.items() if k not in ('epochs', 'blr'))
    assert parse_args([]).model == 'm2d_vit_base'  # no preset: the published defaults


def test_mask_span_trains_with_whole_time_columns_masked(lms_data, tmp_path, capsys, one_thread):
    from m2d.train.config import parse_args
    model = build_model(parse_args(tiny_argv(lms_data, tmp_path, '--mask_span', '3')))
    _, _, (_, mask) = model(torch.randn(4, 1, 80, 96), mask_ratio=0.5)
    grid = mask.reshape(4, *model.grid_size())
    assert torch.equal(grid, grid[:, :1].expand_as(grid)) and (grid[:, 0].sum(1) == grid.shape[2] // 2).all()
    assert build_model(parse_args(tiny_argv(lms_data, tmp_path))).mask_fn.__name__ == 'random_unstructured_mask'
    for bad, says in [(['--mask_span', '6'], '--mask_span must be 0 (off) to 5'),
                      (['--mask_span', '2', '--mask_span_share', '0'], '--mask_span_share must be above 0')]:
        assert cli(argv=tiny_argv(lms_data, tmp_path / 'bad', *bad)) == 2
        assert says in capsys.readouterr().err
    out = run(tiny_argv(lms_data, tmp_path / 'run', '--mask_span', '3', '--epochs', '1'))
    assert load_checkpoint(out.last_checkpoint)['args'].mask_span == 3


def test_init_from_starts_a_new_run_from_the_weights(lms_data, tmp_path, capsys, one_thread):
    """--init_from takes the model and sizes from the checkpoint, loads encoder, predictor and target (or
    copies the encoder into the target for encoder-only weights), and starts a fresh optimizer: with lr 0
    and an EMA decay of 1 the weights at the end are those it started from."""
    first = run(tiny_argv(lms_data, tmp_path / 'first', '--epochs', '1')).last_checkpoint
    start = load_checkpoint(first)['model']
    frozen = ['--blr', '0', '--ema_decay_init', '1', '--ema_decay', '1', '--epochs', '1', '--warmup_epochs', '0']
    data = ['--device', 'cpu', '--num_workers', '0', '--batch_size', '8', '--data_path', str(lms_data),
            '--dataset', str(lms_data / 'files.csv'), '--eval_scripts', str(lms_data / 'none'), '--print_freq', '1']

    def further(init: Path, out: str, *extra: str) -> dict:
        from m2d.train.config import parse_args
        argv = ['--init_from', str(init), *data, *frozen, '--output_dir', str(tmp_path / out), *extra]
        result = main(parse_args(argv))
        return load_checkpoint(result.last_checkpoint)

    full = further(first, 'full')
    assert (full['args'].model, full['args'].depth, full['args'].decoder_depth, full['args'].input_size) == \
        ('m2d_vit_tiny', 2, 2, [80, 96])
    assert full['epoch'] == 1 and full['args'].norm_stats == pytest.approx(load_checkpoint(first)['args'].norm_stats)
    assert all(torch.equal(full['model'][k], v) for k, v in start.items())
    assert 'predictor from the checkpoint, target from the checkpoint' in capsys.readouterr().out

    encoder_only = tmp_path / 'm2d_vit_tiny-80x96p16x16-000000-enc' / 'weights.pth'
    encoder_only.parent.mkdir()
    torch.save({k: v for k, v in start.items() if not k.startswith(('decoder', 'target', 'mask_token'))}, encoder_only)
    enc = further(encoder_only, 'enc', '--input_size', '80x64')  # another crop length: position tables are rebuilt
    assert enc['args'].input_size == [80, 64] and enc['model']['pos_embed'].shape[1] == 1 + 5 * 4
    encoder = [k for k in start if k.startswith(('blocks.', 'norm.', 'patch_embed'))]
    assert all(torch.equal(enc['model'][k], start[k]) for k in encoder)
    assert all(torch.equal(enc['model']['target_' + k], start[k]) for k in start if k.startswith(('blocks.', 'norm.')))
    assert not torch.equal(enc['model']['decoder_embed.weight'], start['decoder_embed.weight'])
    assert 'predictor fresh, target a copy of the encoder' in capsys.readouterr().out

    assert cli(argv=['--init_from', str(first), *data, '--model', 'm2d_vit_small', '--output_dir',
                     str(tmp_path / 'bad')]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f'error: --init_from {first}: ') and 'shape mismatches' in err
    assert cli(argv=['--init_from', str(first), '--resume', str(first), *data]) == 2
    assert 'either --resume' in capsys.readouterr().err
