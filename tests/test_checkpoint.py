"""m2d.checkpoint: safe loading on every load path, clear errors, the folder-name format, and checkpoints
that describe themselves (renamed folders, --resume alone, a custom --output_dir's closing evaluation)."""
import argparse
import datetime
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_checkpoint, make_lms_dataset
from test_pretrain import tiny_argv as pretrain_argv
from test_run_safety import resume_argv

import m2d.hear as hear
from m2d.audio.synth import write_labelled_task
from m2d.checkpoint import describe, load_checkpoint, parse_folder_name, split_state
from m2d.cli import main as m2d_main
from m2d.cli.train import cli
from m2d.errors import CheckpointError, UnsafeCheckpointError
from m2d.eval.__main__ import main as eval_main
from m2d.runtime.runtime import RuntimeM2D
from m2d.train.config import get_args_parser
from m2d.train.main import main as pretrain_main

pytestmark = pytest.mark.usefixtures('one_thread')
REPO = Path(__file__).resolve().parents[1]


class WritesMarker:
    """Unpickling this calls open(path, 'w'): a stand-in for what a crafted checkpoint could run."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, 'w')


def resave(src: Path, dst: Path, **extra) -> Path:
    """Copy a tiny checkpoint's weights into `dst` (same folder naming) with extra top-level entries."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    torch.save({**torch.load(src), **extra}, dst)
    return dst


def one_line_error(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1 and 'Traceback' not in text, text
    return lines[0]


@pytest.fixture
def crafted(tiny_ckpt, tmp_path):
    """A checkpoint whose unpickling would write `marker`; and proof that the payload does work."""
    marker = tmp_path / 'MARKER'
    proof = tmp_path / 'proof-marker'
    trusted = resave(tiny_ckpt, tmp_path / 'proof' / tiny_ckpt.parent.name / 'checkpoint-1.pth',
                     args=WritesMarker(proof))
    torch.load(trusted, weights_only=False)  # what the old fallback did
    assert proof.exists()
    path = resave(tiny_ckpt, tmp_path / tiny_ckpt.parent.name / 'checkpoint-1.pth', args=WritesMarker(marker))
    yield path, marker
    assert not marker.exists()


def test_crafted_checkpoint_is_refused_on_every_load_path(crafted, tmp_path, capsys):
    path, marker = crafted
    with pytest.raises(UnsafeCheckpointError) as e:
        load_checkpoint(path)
    assert str(path) in str(e.value) and 'io.open' in str(e.value) and 'trust_checkpoint=True' in str(e.value)
    with pytest.raises(UnsafeCheckpointError, match='refused to load'):
        RuntimeM2D(weight_file=str(path))
    with pytest.raises(UnsafeCheckpointError, match='refused to load'):
        hear.load_model(str(path))

    write_labelled_task(tmp_path / 'task', n_per_class=(2, 1, 1), seconds=0.5)
    assert m2d_main(['encode', str(path), str(tmp_path / 'task' / 'audio'), str(tmp_path / 'out')]) == 2
    assert 'refused to load' in one_line_error(capsys.readouterr().err)
    assert eval_main(['lineareval', str(path), str(tmp_path / 'task' / 'metadata.csv'),
                      '--results', str(tmp_path / 'r.csv')]) == 2
    assert 'error: lineareval: refused to load' in one_line_error(capsys.readouterr().err)
    data = make_lms_dataset(tmp_path / 'data')
    assert cli(argv=['--resume', str(path), '--data_path', str(data), '--dataset', str(data / 'files.csv')]) == 2
    assert 'error: --resume: refused to load' in one_line_error(capsys.readouterr().err)
    assert cli(argv=['--init_from', str(path), '--data_path', str(data), '--dataset', str(data / 'files.csv'),
                     '--output_dir', str(tmp_path / 'further')]) == 2
    assert 'error: --init_from: refused to load' in one_line_error(capsys.readouterr().err)
    assert not marker.exists() and not (tmp_path / 'further').exists()


def test_trust_checkpoint_is_the_opt_in(tiny_ckpt, tmp_path, capsys):
    # A harmless object that the weights-only loader still refuses: a date in the saved training args.
    path = resave(tiny_ckpt, tmp_path / tiny_ckpt.parent.name / 'checkpoint-1.pth', saved_on=datetime.date(2024, 1, 2))
    with pytest.raises(UnsafeCheckpointError, match='datetime.date'):
        RuntimeM2D(weight_file=str(path))
    assert load_checkpoint(path, trust=True)['saved_on'] == datetime.date(2024, 1, 2)
    lms = torch.randn(1, 1, 80, 100)
    expected = RuntimeM2D(weight_file=str(tiny_ckpt)).encode_lms(lms)
    assert torch.equal(RuntimeM2D(weight_file=str(path), trust_checkpoint=True).encode_lms(lms), expected)
    assert torch.equal(hear.load_model(str(path), trust_checkpoint=True).encode_lms(lms), expected)
    task = write_labelled_task(tmp_path / 'task', n_per_class=(2, 1, 1), seconds=0.5)
    assert m2d_main(['encode', str(path), str(task.parent / 'audio'), str(tmp_path / 'out'), '--trust_checkpoint']) == 0
    assert len(list((tmp_path / 'out').rglob('*.npy'))) == len(list((task.parent / 'audio').rglob('*.wav')))
    eval_main(['lineareval', str(path), str(task), '--results', str(tmp_path / 'r.csv'), '--trust_checkpoint',
               '--epochs', '2', '--cache_dir', str(tmp_path / 'cache')])
    assert 'accuracy' in capsys.readouterr().out


def test_unreadable_weight_files_give_one_line_errors(tiny_ckpt, tmp_path, capsys):
    data = tiny_ckpt.read_bytes()
    folder = tmp_path / tiny_ckpt.parent.name
    folder.mkdir()
    (folder / 'truncated.pth').write_bytes(data[:len(data) // 2])
    (folder / 'text.pth').write_text('not a checkpoint')
    (folder / 'empty.pth').write_bytes(b'')
    for name in ('truncated.pth', 'text.pth', 'empty.pth'):
        with pytest.raises(CheckpointError,
                           match=f'cannot read .*{name}: not a PyTorch checkpoint, or truncated or corrupt'):
            RuntimeM2D(weight_file=str(folder / name))
    # Another architecture under this folder's name (m2d_vit_small weights): strict loading lists what differs.
    shutil.move(make_checkpoint(tmp_path / 'other', model='m2d_vit_small'), folder / 'wrong.pth')
    write_labelled_task(tmp_path / 'task', n_per_class=(2, 1, 1), seconds=0.5)
    for name, message in (('missing.pth', 'weight file not found'), ('truncated.pth', 'truncated or corrupt'),
                          ('wrong.pth', r'does not match m2d_vit_tiny.*shape mismatches \(\d+\): cls_token: '
                                        r'checkpoint \[1, 1, 384\] vs model \[1, 1, 192\]')):
        code = m2d_main(['encode', str(folder / name), str(tmp_path / 'task' / 'audio'), str(tmp_path / 'o')])
        line = one_line_error(capsys.readouterr().err)
        assert code == 2 and line.startswith('error:') and re.search(message, line), line
    # Depths follow the checkpoint; an explicit one that disagrees lists the blocks it does not have.
    shutil.move(make_checkpoint(tmp_path / 'deep', depth=3), folder / 'deep.pth')
    assert len(RuntimeM2D(weight_file=str(folder / 'deep.pth')).backbone.blocks) == 3
    with pytest.raises(CheckpointError, match=r'unexpected keys \(24\): blocks.2.norm1.weight'):
        RuntimeM2D(weight_file=str(folder / 'deep.pth'), depth=2)
    data_root = make_lms_dataset(tmp_path / 'data')
    for name in ('truncated.pth', 'empty.pth'):
        argv = ['--resume', str(folder / name), '--data_path', str(data_root),
                '--dataset', str(data_root / 'files.csv')]
        assert cli(argv=argv) == 2
        assert 'error: --resume: cannot read' in one_line_error(capsys.readouterr().err)


def test_folder_names_of_the_whole_family():
    first = parse_folder_name('m2d_vit_base-80x608p16x16-220930-mr7')
    assert (first.model, first.input_size, first.patch_size, first.sr, first.extra) == \
        ('m2d_vit_base', [80, 608], [16, 16], '', [])
    later = parse_folder_name('m2d_as_vit_base-80x608p16x16p32k-240413_enconly')
    assert (later.model, later.input_size, later.sr) == ('m2d_as_vit_base', [80, 608], '32k')
    clap = parse_folder_name('m2d_clap_vit_base-80x1001p16x16p16kpBpTI-2025')
    assert (clap.input_size, clap.sr, clap.extra) == ([80, 1001], '16k', ['B', 'TI'])
    fine = parse_folder_name('m2d_vit_base-80x200p16x4-230529')
    assert (fine.patch_size, fine.sr) == ([16, 4], '')
    assert parse_folder_name('m2d_vit_base-80x208p16x16p16k-random').sr == '16k'
    assert parse_folder_name('my_model') is None and parse_folder_name('m2d_vit_base-80x608') is None


def test_explicit_arguments_then_checkpoint_then_folder_name(tmp_path):
    torch.manual_seed(0)
    from m2d.model.vit import create_model
    net = create_model('m2d_vit_tiny', img_size=[80, 96], depth=2, decoder_depth=1)
    args = argparse.Namespace(model='m2d_vit_tiny', input_size=[80, 96], patch_size=[16, 16], depth=2, decoder_depth=1)
    path = tmp_path / 'm2d_vit_small-80x608p16x16p32k-x' / 'checkpoint-5.pth'  # a folder name that lies
    path.parent.mkdir()
    ckpt = {'model': net.state_dict(), 'args': args}
    torch.save(ckpt, path)
    spec = describe(path, ckpt, split_state(net.state_dict()))
    assert (spec.model, spec.input_size, spec.depth, spec.decoder_depth) == ('m2d_vit_tiny', [80, 96], 2, 1)
    assert spec.sources['model'] == 'checkpoint' and spec.sr == '32k' and spec.sources['sr'] == 'folder name'
    spec = describe(path, ckpt, split_state(net.state_dict()), input_size='80x48', sr='16k')
    assert spec.input_size == [80, 48] and spec.sources['input_size'] == 'argument' and spec.sr == '16k'
    rt = RuntimeM2D(weight_file=str(path), sr='16k')  # the args win over the folder name
    assert (rt.cfg.model, rt.cfg.input_size, len(rt.backbone.decoder_blocks)) == ('m2d_vit_tiny', [80, 96], 1)


def tiny_argv(data: Path, out, *extra: str) -> list[str]:
    """test_pretrain's tiny run, with a one-block predictor and 3 epochs."""
    return pretrain_argv(data, out, '--decoder_depth', '1', '--epochs', '3', *extra)


def test_resume_continues_with_the_stored_model_and_schedule(lms_data, tmp_path, monkeypatch, capsys):
    """--resume with only this machine's data and scripts continues the run as it was started: the
    model and the optimisation come from the checkpoint (the paths never do: tests/test_run_safety.py)."""
    straight = pretrain_main(get_args_parser().parse_args(tiny_argv(lms_data, tmp_path / 'my run'))).output_dir
    stopped = tmp_path / 'another name'
    pretrain_main(get_args_parser().parse_args(tiny_argv(lms_data, stopped, '--stop_at', '1')))
    monkeypatch.chdir(tmp_path)  # somewhere else: the run folder is the checkpoint's
    here = resume_argv(lms_data)
    assert cli(argv=['--resume', str(stopped / 'checkpoint-1.pth'), *here]) == 0
    assert 'Resumed from' in capsys.readouterr().out
    a, b = load_checkpoint(straight / 'checkpoint-3.pth'), load_checkpoint(stopped / 'checkpoint-3.pth')
    assert all(torch.equal(a['model'][k], b['model'][k]) for k in a['model'])
    assert b['args'].decoder_depth == 1 and b['args'].input_size == [80, 96]
    # A flag given with --resume overrides the stored one: two more epochs.
    assert cli(argv=['--resume', str(stopped / 'checkpoint-3.pth'), *here, '--epochs', '5', '--stop_at', '4']) == 0
    resumed = load_checkpoint(stopped / 'checkpoint-4.pth')
    assert resumed['epoch'] == 4 and resumed['args'].epochs == 5 and resumed['args'].decoder_depth == 1


def test_custom_output_dir_run_ends_with_a_working_all_eval(lms_data, tmp_path, monkeypatch, capsys):
    task = write_labelled_task(tmp_path / 'task', n_per_class=(2, 1, 1), seconds=0.5)
    for key, value in (('M2D_EVAL_TASKS', str(task)), ('M2D_EVAL_RESULTS', str(tmp_path / 'scores.csv')),
                       ('M2D_EVAL_CACHE', str(tmp_path / 'cache')), ('OMP_NUM_THREADS', '1')):
        monkeypatch.setenv(key, value)
    monkeypatch.delenv('EVAR_ROOT', raising=False)
    out = tmp_path / 'my experiment'
    argv = tiny_argv(lms_data, out, '--epochs', '1', '--eval_scripts', str(REPO))
    pretrain_main(get_args_parser().parse_args(argv))
    log = (out / 'all_eval.log').read_text()
    assert 'all_eval.sh finished with exit status 0' in capsys.readouterr().out, log[-2000:]
    assert f'[all] {task}: accuracy' in log and '| my experiment/checkpoint-1 |' in log
    rt = RuntimeM2D(weight_file=str(out / 'checkpoint-1.pth'))
    assert rt.spec.sources['model'] == 'checkpoint' and rt.cfg.input_size == [80, 96]
