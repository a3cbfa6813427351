"""`python -m m2d encode` / m2d.tools.encode: audio files -> .npy embeddings."""
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import (
    fill_disk_after_one_save,
    make_checkpoint,
    peak_memory_of,
    press_ctrl_c,
    sparse_wav,
    start_as_in_a_terminal,
)

import m2d.tools.encode
from m2d.audio.io import load_audio
from m2d.cli import main
from m2d.errors import UsageError
from m2d.tools.encode import encode_files

pytestmark = pytest.mark.usefixtures('one_thread')


def tone(seconds: float, sr: int, channels: int = 1, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    wav = 0.3 * np.sin(2 * np.pi * (220 + 100 * seed) * t) + 0.05 * rng.standard_normal(t.size)
    return np.stack([wav * (c + 1) / channels for c in range(channels)], axis=1).astype(np.float32)


@pytest.fixture
def audio_dir(tmp_path):
    root = tmp_path / 'audio'
    (root / 'a').mkdir(parents=True)
    (root / 'b' / 'c').mkdir(parents=True)
    sf.write(root / 'a' / 'tone16k.wav', tone(1.2, 16000), 16000)
    sf.write(root / 'b' / 'stereo44k.wav', tone(0.9, 44100, channels=2, seed=1), 44100)
    sf.write(root / 'b' / 'c' / 'deep8k.flac', tone(2.1, 8000, seed=2), 8000)
    sf.write(root / 'silence.wav', np.zeros((16000, 1), np.float32), 16000)
    sf.write(root / 'short.wav', tone(0.05, 16000), 16000)
    sf.write(root / 'empty.wav', np.zeros((0, 1), np.float32), 16000)
    (root / 'corrupt.wav').write_bytes(b'RIFF\x00\x00not really a wave file')
    (root / 'notes.txt').write_text('not audio')
    return root


GOOD = {'a/tone16k': 'a/tone16k.wav', 'b/stereo44k': 'b/stereo44k.wav', 'b/c/deep8k': 'b/c/deep8k.flac'}
BAD = {'silence.wav': 'digital silence', 'short.wav': 'shorter than one patch', 'corrupt.wav': 'cannot read audio',
       'empty.wav': 'no audio samples'}


def test_folder_clip_embeddings_and_failures(tiny_ckpt, rt, audio_dir, tmp_path):
    """Per-clip normalisation (dataset_norm=False): each file's embedding is the runtime's of that file alone."""
    out = tmp_path / 'emb'
    report = encode_files(tiny_ckpt, audio_dir, out, dataset_norm=False, batch_size=2, progress=False)
    assert sorted(str(p.relative_to(out)) for p in report.encoded) == sorted(f'{g}.npy' for g in GOOD)
    assert sorted(p.name for p, _ in report.failed) == sorted(BAD) and report.ok
    for path, reason in report.failed:
        assert BAD[path.name] in reason
    for name in GOOD:
        emb = np.load(out / f'{name}.npy')
        expected = rt.get_scene_embeddings(torch.from_numpy(load_audio(audio_dir / GOOD[name]))[None])[0]
        assert emb.shape == (960,) and emb.dtype == np.float32
        np.testing.assert_allclose(emb, expected.numpy(), atol=1e-5, rtol=1e-5)
    assert not (out / 'silence.npy').exists() and not (out / 'notes.npy').exists()


def test_frames_and_batch_size_independence(tiny_ckpt, rt, audio_dir, tmp_path):
    one = encode_files(tiny_ckpt, audio_dir, tmp_path / 'one', frames=True, dataset_norm=False, batch_size=1,
                       progress=False)
    many = encode_files(tiny_ckpt, audio_dir, tmp_path / 'many', frames=True, dataset_norm=False, batch_size=8,
                        progress=False)
    assert len(one.encoded) == len(many.encoded) == 3
    for name in GOOD:
        a, b = np.load(tmp_path / 'one' / f'{name}.npy'), np.load(tmp_path / 'many' / f'{name}.npy')
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
    wav = load_audio(audio_dir / 'b' / 'c' / 'deep8k.flac')
    frames = np.load(tmp_path / 'many' / 'b' / 'c' / 'deep8k.npy')
    assert frames.shape == (math.ceil((1 + len(wav) // 160) / 16), 960)
    np.testing.assert_allclose(frames, rt.encode(torch.from_numpy(wav)[None])[0].numpy(), atol=1e-5, rtol=1e-5)


def test_single_file_and_skip_existing(tiny_ckpt, audio_dir, tmp_path):
    src = audio_dir / 'b' / 'stereo44k.wav'
    report = encode_files(tiny_ckpt, src, tmp_path / 'out', progress=False)
    assert report.encoded == [tmp_path / 'out' / 'stereo44k.npy']
    target = tmp_path / 'named.npy'
    assert encode_files(tiny_ckpt, src, target, progress=False).encoded == [target]
    np.save(target, np.zeros(3, np.float32))  # an existing output is kept ...
    again = encode_files(tiny_ckpt, src, target, progress=False)
    assert again.skipped == [target] and not again.encoded and again.ok and np.load(target).shape == (3,)
    redone = encode_files(tiny_ckpt, src, target, overwrite=True, progress=False)  # ... unless overwrite
    assert redone.encoded == [target] and np.load(target).shape == (960,)


def test_norm_options(tiny_ckpt, rt, audio_dir, tmp_path):
    fixed = encode_files(tiny_ckpt, audio_dir, tmp_path / 'fixed', norm_stats=(-8.0, 3.0), progress=False)
    assert len(fixed.encoded) == 4  # digital silence is encodable with fixed statistics
    assert fixed.norm_stats is None  # given statistics take the place of the dataset's
    lms = rt.to_feature(torch.from_numpy(load_audio(audio_dir / 'a' / 'tone16k.wav'))[None])
    expected = rt.encode_lms((lms + 8.0) / 3.0).mean(dim=1)[0]
    np.testing.assert_allclose(np.load(tmp_path / 'fixed' / 'a' / 'tone16k.npy'), expected, atol=1e-5, rtol=1e-5)

    data = encode_files(tiny_ckpt, audio_dir, tmp_path / 'data', batch_size=3, progress=False)  # the default
    readable = [p for p in audio_dir.rglob('*') if p.suffix in ('.wav', '.flac')
                and p.name not in ('corrupt.wav', 'empty.wav', 'short.wav')]
    values = torch.cat([rt.to_feature(torch.from_numpy(load_audio(p))[None]).flatten() for p in readable]).double()
    np.testing.assert_allclose(data.norm_stats, (values.mean().item(), values.std(unbiased=False).item()), rtol=1e-6)
    assert sorted(p.name for p, _ in data.failed) == ['corrupt.wav', 'empty.wav', 'short.wav']
    assert len(data.encoded) == 4
    mean, std = data.norm_stats
    expected = rt.encode_lms((lms - mean) / std).mean(dim=1)[0]
    np.testing.assert_allclose(np.load(tmp_path / 'data' / 'a' / 'tone16k.npy'), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(UsageError, match='input not found'):
        encode_files(tiny_ckpt, tmp_path / 'nowhere', tmp_path / 'x')


def test_command_line(tiny_ckpt, audio_dir, tmp_path, capsys):
    out = tmp_path / 'cli'
    assert main(['encode', str(tiny_ckpt), str(audio_dir), str(out), '--frames', '--batch_size', '2',
                 '--norm_stats', '-8', '3']) == 0
    printed = capsys.readouterr().out
    assert 'encoded 4, skipped 0' in printed and 'FAILED' in printed and 'corrupt.wav' in printed
    assert np.load(out / 'a' / 'tone16k.npy').shape == (8, 960)
    assert main(['encode', str(tiny_ckpt), str(audio_dir), str(out)]) == 0  # everything exists: skipped
    assert 'skipped 4' in capsys.readouterr().out
    bad = tmp_path / 'bad'
    bad.mkdir()
    (bad / 'x.wav').write_bytes(b'junk')
    assert main(['encode', str(tiny_ckpt), str(bad), str(tmp_path / 'o')]) == 1
    assert 'x.wav' in capsys.readouterr().out
    (tmp_path / 'empty').mkdir()
    assert main(['encode', str(tiny_ckpt), str(tmp_path / 'empty'), str(tmp_path / 'o')]) == 1
    assert 'no .wav/.flac/.ogg files found' in capsys.readouterr().out


def test_module_entry_point_and_usage_errors(capsys):
    done = subprocess.run([sys.executable, '-m', 'm2d', 'encode', '--help'], capture_output=True, text=True)
    assert done.returncode == 0 and 'usage: m2d encode' in done.stdout and '--dataset_norm' in done.stdout
    for argv, prog in (([], 'm2d'), (['nope'], 'm2d'), (['encode', 'only_weights'], 'm2d encode')):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith('error: ') and err.endswith(f' (see {prog} --help)\n') and err.count('\n') == 1


def test_weight_and_output_problems_are_one_line_errors(tiny_ckpt, audio_dir, tmp_path, capsys):
    wrong = tmp_path / 'm2d_vit_tiny-80x208p16x16-000000-x' / 'checkpoint-1.pth'  # the name says 80x208 ...
    wrong.parent.mkdir()
    wrong.write_bytes(make_checkpoint(tmp_path / 'small', input_size=(80, 96)).read_bytes())  # ... the weights 80x96
    truncated = tmp_path / tiny_ckpt.parent.name / 'checkpoint-1.pth'
    truncated.parent.mkdir()
    truncated.write_bytes(tiny_ckpt.read_bytes()[:5000])
    missing = tmp_path / tiny_ckpt.parent.name / 'checkpoint-9.pth'
    for weights, why in [(missing, 'not found'), (truncated, str(truncated)), (wrong, 'does not match')]:
        assert main(['encode', str(weights), str(audio_dir), str(tmp_path / 'out')]) == 2
        err = capsys.readouterr().err
        assert err.startswith('error: ') and str(weights) in err and why in err
        assert 'Traceback' not in err  # (a mismatch lists the keys on a few more lines)
    assert not list((tmp_path / 'out').rglob('*.npy'))

    (tmp_path / 'a_file').write_text('x')
    assert main(['encode', str(tiny_ckpt), str(audio_dir), str(tmp_path / 'a_file')]) == 2
    assert capsys.readouterr().err == f'error: cannot write {tmp_path / "a_file"}: it is a file, not a folder\n'
    assert main(['encode', str(tiny_ckpt), str(tmp_path / 'nowhere'), str(tmp_path / 'out')]) == 2
    assert 'error: input not found' in capsys.readouterr().err
    with pytest.raises(SystemExit, match='2'):
        main(['encode', str(tiny_ckpt), str(audio_dir), str(tmp_path / 'out'), '--norm_stats', '[-8, nan]'])
    assert 'two finite numbers' in capsys.readouterr().err


def test_truncated_audio_is_reported(tiny_ckpt, tmp_path):
    (tmp_path / 'in').mkdir()
    sf.write(tmp_path / 'in' / 'whole.wav', tone(1.0, 16000), 16000)
    data = (tmp_path / 'in' / 'whole.wav').read_bytes()
    (tmp_path / 'in' / 'cut.wav').write_bytes(data[:len(data) // 2])
    report = encode_files(tiny_ckpt, tmp_path / 'in', tmp_path / 'out', progress=False)
    assert [p.name for p in report.encoded] == ['whole.npy']
    held = sf.info(str(tmp_path / 'in' / 'cut.wav')).frames  # what libsndfile finds, with no error
    assert report.failed == [(tmp_path / 'in' / 'cut.wav', f'truncated: header says 16000 samples, file holds {held}')]


def test_ctrl_c_says_how_far_it_got_and_a_rerun_continues(tiny_ckpt, tmp_path):
    (tmp_path / 'in').mkdir()
    for i in range(6):
        sf.write(tmp_path / 'in' / f'{i}.wav', tone(0.5 + 0.1 * i, 16000, seed=i), 16000)
    # Each save is slowed down so that Ctrl-C surely comes mid-run; the rest is the real command.
    slowed = ('import sys, time; import m2d.tools.encode as e; from m2d.cli import main\n'
              'save = e.save_npy_atomic\n'
              'e.save_npy_atomic = lambda *a: (time.sleep(1), save(*a))[1]\n'
              'sys.exit(main(sys.argv[1:]))')
    cmd = [sys.executable, '-c', slowed, 'encode', str(tiny_ckpt), str(tmp_path / 'in'), str(tmp_path / 'out'),
           '--batch_size', '1', '--device', 'cpu']
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': str(Path(__file__).resolve().parents[1])}
    proc = start_as_in_a_terminal(cmd, stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + 120
    while not list((tmp_path / 'out').glob('*.npy')) and time.monotonic() < deadline:
        time.sleep(0.05)
    err = press_ctrl_c(proc, timeout=60)
    assert proc.returncode == 130, err
    done = len(list((tmp_path / 'out').glob('*.npy')))
    assert 1 <= done < 6 and 'Traceback' not in err
    assert err.splitlines()[-1] == f'interrupted; {done} of 6 files encoded, rerun the same command to continue'
    report = encode_files(tiny_ckpt, tmp_path / 'in', tmp_path / 'out', progress=False)
    assert len(report.skipped) == done and len(report.encoded) == 6 - done


def test_audio_over_max_seconds_fails_from_its_header_without_decoding(tiny_ckpt, tmp_path):
    """A header claiming 8 hours (a sparse file: no disk used) is refused before its samples are read."""
    (tmp_path / 'in').mkdir()
    sf.write(tmp_path / 'in' / 'a.wav', tone(1.0, 16000), 16000)
    decoded = sparse_wav(tmp_path / 'in' / 'long.wav', hours=8)  # 1.8 GB of float32 samples
    done, peak = peak_memory_of(['encode', str(tiny_ckpt), str(tmp_path / 'in'), str(tmp_path / 'out'),
                                 '--device', 'cpu', '--dataset_norm'], timeout=120)
    assert done.returncode == 0, done.stderr
    assert f'  FAILED {tmp_path / "in" / "long.wav"}: 8.0 h of audio (28800 s) is over --max_seconds 3600; ' \
           'raise --max_seconds to read it' in done.stdout.splitlines()
    assert sorted(p.name for p in (tmp_path / 'out').iterdir()) == ['a.npy']
    assert peak < 1.3 * 2 ** 30 < decoded  # Python with torch and the model alone is about 0.8 GB

    sf.write(tmp_path / 'in' / 'b.wav', tone(2.0, 16000), 16000)
    report = encode_files(tiny_ckpt, tmp_path / 'in', tmp_path / 'out', max_seconds=1.5, progress=False)
    assert report.failed == [(tmp_path / 'in' / 'b.wav', '2.0 s of audio is over --max_seconds 1.5; '
                              'raise --max_seconds to read it'),
                             (tmp_path / 'in' / 'long.wav', '8.0 h of audio (28800 s) is over --max_seconds 1.5; '
                              'raise --max_seconds to read it')]
    with pytest.raises(ValueError, match='--max_seconds must be more than 0 seconds, got -1'):
        encode_files(tiny_ckpt, tmp_path / 'in', tmp_path / 'out', max_seconds=-1)


def test_a_write_error_fails_its_file_and_a_full_disk_stops_the_run(tiny_ckpt, tmp_path, monkeypatch, capsys):
    (tmp_path / 'in' / 'sub').mkdir(parents=True)
    names = ['n' * 251 + '.wav', 'é' * 125 + '.wav', 'sub/x.wav']  # 255-byte names leave room for the temp file
    for i, name in enumerate(names):
        sf.write(tmp_path / 'in' / name, tone(0.5 + 0.1 * i, 16000, seed=i), 16000)
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'sub').write_text('a file where the folder sub/ should be')
    report = encode_files(tiny_ckpt, tmp_path / 'in', out, progress=False)
    assert sorted(p.name for p in report.encoded) == sorted(n[:-4] + '.npy' for n in names[:2])
    assert report.failed == [(tmp_path / 'in' / 'sub' / 'x.wav',
                              f'cannot write {out / "sub" / "x.npy"}: a file is in the way, not a folder')]

    saves = fill_disk_after_one_save(monkeypatch, m2d.tools.encode)
    assert main(['encode', str(tiny_ckpt), str(tmp_path / 'in'), str(tmp_path / 'full'), '--batch_size', '1']) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (f'error: cannot write {saves[1]}: no space left on device; '
                                                        '1 of 3 files encoded, rerun the same command to continue')
    assert len(saves) == 2 and list((tmp_path / 'full').rglob('*.npy')) == [saves[0]]
