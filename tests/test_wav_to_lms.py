"""wav_to_lms: bit-exact librosa loading, folder conversion, skipping, failure reports, CLI rules, file list."""
import errno
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch
from conftest import fill_disk_after_one_save, peak_memory_of, press_ctrl_c, sparse_wav, start_as_in_a_terminal

import m2d.tools.wav_to_lms
from m2d.audio.io import load_audio, mix_to_mono
from m2d.audio.lms import EPS, LogMelSpectrogram
from m2d.errors import AudioReadError, OutputError, UsageError
from m2d.runtime.runtime import RuntimeM2D
from m2d.tools.wav_to_lms import convert_folder, main, write_file_list

ROOT = Path(__file__).resolve().parents[1]
# relative path -> (sample rate, seconds, channels); converted by default (suffix .wav)
GOOD = {'a/x.wav': (16000, 1.0, 1), 'a/b/y.wav': (44100, 1.3, 2), 'z.wav': (22050, 0.7, 3),
        'odd.wav': (7999, 0.9, 1)}
BAD = ('bad.wav', 'empty.wav', 'tiny.wav')  # corrupt bytes, no samples, too short for one frame


def _write(path: Path, sr: int, seconds: float, channels: int, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    x = np.random.default_rng(seed).uniform(-0.5, 0.5, (int(sr * seconds), channels)).astype(np.float32)
    sf.write(path, x, sr)


@pytest.fixture(scope='module')
def corpus(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp('src')
    for i, (rel, spec) in enumerate(GOOD.items()):
        _write(src / rel, *spec, seed=i)
    (src / 'bad.wav').write_bytes(b'RIFF\x00\x01garbage, not a wave file')
    sf.write(src / 'empty.wav', np.zeros((0, 1), np.float32), 16000)
    _write(src / 'tiny.wav', 16000, 0.005, 1)  # 80 samples
    _write(src / 'other.flac', 16000, 0.5, 1)   # another suffix: not converted by default
    return src


def _npy_files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob('*.npy'))


def _expected_npy() -> list[str]:
    return sorted(rel[:-4] + '.npy' for rel in GOOD)


@pytest.mark.filterwarnings('ignore::DeprecationWarning')  # audioread, imported by librosa, on Python 3.11+
@pytest.mark.parametrize('sr,channels,subtype', [(16000, 1, 'PCM_16'), (44100, 2, 'PCM_16'), (22050, 1, 'FLOAT'),
                                                 (48000, 2, 'PCM_24'), (7999, 3, 'PCM_16'), (11025, 1, 'PCM_16')])
def test_load_audio_equals_librosa_load(tmp_path, sr, channels, subtype):
    import librosa
    for seconds in (0.37, 1.0):
        path = tmp_path / f'{seconds}.wav'
        x = np.random.default_rng(sr).uniform(-1, 1, (int(sr * seconds) + 3, channels)).astype(np.float32)
        sf.write(path, x, sr, subtype=subtype)
        ours, ref = load_audio(path), librosa.load(path, sr=16000, mono=True)[0]
        assert ours.dtype == ref.dtype == np.float32
        assert ours.shape == ref.shape and np.array_equal(ours, ref)


@pytest.mark.parametrize('channels', [1, 2, 3, 7, 8, 9])
def test_mix_to_mono_equals_librosa(channels):
    import librosa
    wav = (np.random.default_rng(channels).standard_normal((5000, channels))
           * np.geomspace(1e-3, 1, channels)).astype(np.float32)
    assert np.array_equal(mix_to_mono(wav), librosa.to_mono(wav.T))


def test_load_audio_rejects_nan(tmp_path):
    x = np.zeros(1000, np.float32)
    x[10] = np.nan
    sf.write(tmp_path / 'nan.wav', x, 16000, subtype='FLOAT')
    with pytest.raises(AudioReadError, match='nan.wav.*NaN'):
        load_audio(tmp_path / 'nan.wav')


@pytest.fixture(scope='module')
def converted(corpus, tmp_path_factory):
    """One in-process conversion (workers=1) shared by the checks below."""
    dst = tmp_path_factory.mktemp('dst') / 'lms'
    return dst, convert_folder(corpus, dst, workers=1, progress=False)


def test_outputs_equal_the_runtime_front_end(corpus, converted, tiny_ckpt, one_thread):
    dst, report = converted
    assert _npy_files(dst) == _expected_npy()
    assert [p.relative_to(dst).as_posix() for p in report.converted] == _expected_npy()
    to_lms = LogMelSpectrogram()
    runtime = RuntimeM2D(weight_file=str(tiny_ckpt))
    for rel in GOOD:
        lms = np.load(dst / (rel[:-4] + '.npy'))
        wav = load_audio(corpus / rel)
        assert lms.dtype == np.float32 and lms.shape == (1, 80, 1 + len(wav) // 160)
        with torch.inference_mode():
            assert np.array_equal(lms, to_lms(torch.from_numpy(wav)[None]).numpy())
            np.testing.assert_allclose(lms, runtime.to_feature(wav[None])[0].numpy(), rtol=0, atol=1e-6)
    assert report.audio_seconds == pytest.approx(sum(len(load_audio(corpus / rel)) for rel in GOOD) / 16000)


def test_failures_reported_by_name(corpus, converted):
    dst, report = converted
    assert [src.name for src, _ in report.failed] == sorted(BAD)
    messages = dict((src.name, message) for src, message in report.failed)
    assert all(str(corpus / name) in messages[name] for name in BAD)
    assert 'no audio samples' in messages['empty.wav'] and 'too short' in messages['tiny.wav']
    assert all(f'FAILED {messages[name]}' in report.summary() for name in BAD)
    assert not [p for p in dst.rglob('*') if p.is_file() and p.suffix != '.npy']  # no temp files left


def test_rerun_skips_existing_outputs(corpus, tmp_path):
    dst = tmp_path / 'lms'
    sentinel = dst / 'a' / 'x.npy'
    sentinel.parent.mkdir(parents=True)
    np.save(sentinel, np.zeros(1))
    report = convert_folder(corpus, dst, workers=1, progress=False)
    assert report.skipped == [sentinel] and np.load(sentinel).shape == (1,)  # left as it was
    assert len(report.converted) == len(GOOD) - 1
    again = convert_folder(corpus, dst, workers=1, progress=False)
    assert again.converted == [] and len(again.skipped) == len(GOOD) and again.ok
    assert len(again.failed) == len(BAD)  # unreadable files are retried and reported every run


def test_two_workers_give_identical_files(corpus, converted, tmp_path):
    dst1, _ = converted
    report = convert_folder(corpus, tmp_path / 'lms', workers=2, progress=False)
    assert len(report.converted) == len(GOOD) and len(report.failed) == len(BAD)
    for rel in _expected_npy():
        assert (tmp_path / 'lms' / rel).read_bytes() == (dst1 / rel).read_bytes()


def test_suffix_and_min_length(corpus, tmp_path):
    report = convert_folder(corpus, tmp_path / 'lms', suffix='.flac', min_length=1.0, workers=1, progress=False)
    assert _npy_files(tmp_path / 'lms') == ['other.npy'] and not report.failed
    lms = np.load(tmp_path / 'lms' / 'other.npy')
    assert lms.shape == (1, 80, 101)  # 0.5 s padded to 16000 samples
    assert np.all(lms[..., -10:] == torch.tensor(EPS).log().item())  # the padding is digital silence


def test_interrupted_write_leaves_no_file(corpus, tmp_path, monkeypatch):
    def half_write(f, array, *args, **kwargs):
        f.write(b'\x93NUMPY partial')
        raise OSError('disk full')
    monkeypatch.setattr(np, 'save', half_write)
    report = convert_folder(corpus, tmp_path / 'lms', workers=1, progress=False)
    assert report.converted == [] and len(report.failed) == len(GOOD) + len(BAD)
    assert all('disk full' in message for src, message in report.failed if src.name not in BAD)
    assert not [p for p in (tmp_path / 'lms').rglob('*') if p.is_file()]


def test_write_file_list(converted, tmp_path):
    dst, _ = converted
    names = write_file_list(dst, tmp_path / 'files.csv', data_path=dst.parent)
    df = pd.read_csv(tmp_path / 'files.csv')
    assert list(df.columns) == ['file_name'] and df.file_name.tolist() == names
    assert names == ['lms/' + rel for rel in _expected_npy()]
    assert all((dst.parent / name).is_file() for name in names)
    with pytest.raises(ValueError, match='not inside the data folder'):
        write_file_list(dst, tmp_path / 'x.csv', data_path=tmp_path)


def test_main_exit_status_and_csv(corpus, tmp_path, capsys):
    data = tmp_path / 'data'
    assert main(str(corpus), str(data / 'lms_c'), workers=1, csv=str(data / 'files_c.csv'), data_path=str(data)) == 0
    err = capsys.readouterr().err
    assert f'converted {len(GOOD)} files' in err and all(f'FAILED {corpus / name}' in err for name in BAD)
    assert pd.read_csv(data / 'files_c.csv').file_name.tolist() == ['lms_c/' + rel for rel in _expected_npy()]
    assert main(str(corpus), str(data / 'lms_c'), workers=1) == 0  # all skipped, bad ones fail again: still fine

    assert main(str(corpus), str(tmp_path / 'none'), suffix='.mp3', workers=1) == 1
    assert 'error: no .mp3 files found' in capsys.readouterr().err
    only_bad = tmp_path / 'only_bad'
    only_bad.mkdir()
    (only_bad / 'bad.wav').write_bytes(b'not audio')
    assert main(str(only_bad), str(tmp_path / 'out'), workers=1) == 1
    assert 'error: all 1 .wav files failed' in capsys.readouterr().err
    with pytest.raises(UsageError, match='not inside the data folder'):
        main(str(corpus), str(tmp_path / 'elsewhere'), workers=1, csv=str(data / 'x.csv'), data_path=str(data))
    assert not (tmp_path / 'elsewhere').exists()  # refused before converting anything
    with pytest.raises(UsageError, match='source folder not found'):
        main(str(tmp_path / 'missing'), str(tmp_path / 'out'))


def test_cli(corpus, tmp_path):
    """The command users type (fire parses the options, a pool of workers): exit 0 with some failures."""
    cmd = [sys.executable, str(ROOT / 'wav_to_lms.py'), str(corpus), 'data/lms_x', '--workers', '2',
           '--csv', 'data/files_x.csv', '--verbose']
    env = {**os.environ, 'PYTHONPATH': str(ROOT)}
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert 'lms_x/a/b/y.npy (1, 80, 131)' in done.stderr and 'FAILED' in done.stderr
    assert pd.read_csv(tmp_path / 'data' / 'files_x.csv').file_name.tolist() == [
        'lms_x/' + rel for rel in _expected_npy()]


def test_truncated_wav_is_reported(tmp_path):
    _write(tmp_path / 'src' / 'whole.wav', 16000, 1.0, 2)
    data = (tmp_path / 'src' / 'whole.wav').read_bytes()
    (tmp_path / 'src' / 'cut.wav').write_bytes(data[:len(data) // 2])  # the header still says 16000 frames
    with pytest.raises(AudioReadError, match='cut.wav: truncated: header says 16000 samples, file holds 79'):
        load_audio(tmp_path / 'src' / 'cut.wav')
    report = convert_folder(tmp_path / 'src', tmp_path / 'lms', workers=1, progress=False)
    assert [p.name for p in report.converted] == ['whole.npy']
    assert [(p.name, 'truncated: header says 16000' in m) for p, m in report.failed] == [('cut.wav', True)]


def test_file_list_converts_only_the_listed_files(corpus, tmp_path, capsys):
    files = tmp_path / 'files.csv'
    files.write_text('file_name,label\na/x.wav,1\nother.flac,2\nmissing.wav,3\n')  # any ending, EVAR-style columns
    assert main(str(corpus), str(tmp_path / 'lms'), workers=1, files=str(files)) == 0
    assert _npy_files(tmp_path / 'lms') == ['a/x.npy', 'other.npy']
    assert f'FAILED {corpus / "missing.wav"}: missing' in capsys.readouterr().err
    (tmp_path / 'list.txt').write_text('z.wav\n')
    assert main(str(corpus), str(tmp_path / 'lms2'), workers=1, files=str(tmp_path / 'list.txt')) == 0
    assert _npy_files(tmp_path / 'lms2') == ['z.npy']

    files.write_text('file_name\na/x.wav\n../escape.wav\n/abs/y.wav\n')
    with pytest.raises(UsageError, match=r'2 file names point outside SRC .*line 3: \.\./escape\.wav, line 4: /abs/'):
        main(str(corpus), str(tmp_path / 'lms3'), workers=1, files=str(files))
    files.write_text('')
    with pytest.raises(UsageError, match=f'file list {files} is empty'):
        main(str(corpus), str(tmp_path / 'lms3'), workers=1, files=str(files))
    assert not (tmp_path / 'lms3').exists()


def test_unwritable_outputs_are_refused_before_converting(corpus, tmp_path, monkeypatch):
    (tmp_path / 'a_file').write_text('x')
    data = tmp_path / 'data'
    with pytest.raises(UsageError, match=f'cannot write {tmp_path}/a_file/files.csv: {tmp_path}/a_file is a file'):
        main(str(corpus), str(data / 'lms'), workers=1, csv=str(tmp_path / 'a_file' / 'files.csv'), data_path=str(data))
    with pytest.raises(UsageError, match=f'cannot write {tmp_path}/a_file/lms: {tmp_path}/a_file is a file'):
        main(str(corpus), str(tmp_path / 'a_file' / 'lms'), workers=1)
    locked = tmp_path / 'locked'
    locked.mkdir()
    if os.geteuid() != 0:
        locked.chmod(0o555)
    else:  # root writes through permission bits: make the write itself fail as a read-only folder would
        real = tempfile.TemporaryFile

        def refuse(*args, dir=None, **kwargs):
            if dir == locked:
                raise OSError(errno.EROFS, 'Read-only file system')
            return real(*args, dir=dir, **kwargs)
        monkeypatch.setattr(tempfile, 'TemporaryFile', refuse)
    try:
        with pytest.raises(UsageError, match=f'cannot write {locked}/files.csv: not writable'):
            main(str(corpus), str(data / 'lms'), workers=1, csv=str(locked / 'files.csv'), data_path=str(data))
    finally:
        locked.chmod(0o755)
    assert not data.exists()  # nothing converted


def test_ctrl_c_stops_the_workers_with_one_line(corpus, tmp_path):
    """A listed FIFO blocks its worker forever: Ctrl-C after the other files is a controlled point."""
    src = tmp_path / 'src'
    for name in ('a.wav', 'b.wav'):
        _write(src / name, 16000, 0.5, 1)
    os.mkfifo(src / 'z_blocks.wav')
    (tmp_path / 'list.txt').write_text('a.wav\nb.wav\nz_blocks.wav\n')
    cmd = [sys.executable, str(ROOT / 'wav_to_lms.py'), str(src), str(tmp_path / 'lms'), '--workers', '2',
           '--files', str(tmp_path / 'list.txt')]
    proc = start_as_in_a_terminal(cmd, cwd=ROOT, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while len(_npy_files(tmp_path / 'lms')) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    err = press_ctrl_c(proc, timeout=60)
    assert proc.returncode == 130, err
    assert err.splitlines()[-1] == 'interrupted; 2 of 3 files converted, rerun the same command to continue'
    assert 'Traceback' not in err and _npy_files(tmp_path / 'lms') == ['a.npy', 'b.npy']


def test_temp_files_of_killed_runs_are_removed(corpus, tmp_path):
    dst = tmp_path / 'lms'
    (dst / 'a').mkdir(parents=True)
    stale = dst / 'a' / '.x.npy.4999999.k3j2h1g0.tmp'  # above any pid_max: its writer is gone
    live = dst / 'a' / f'.y.npy.{os.getpid()}.abcdefgh.tmp'  # a writer that is still running
    other = dst / '.notes.tmp'  # not one of ours
    for path in (stale, live, other):
        path.write_bytes(b'partial')
    convert_folder(corpus, dst, workers=1, progress=False)
    assert not stale.exists() and live.exists() and other.exists()


def test_audio_over_max_seconds_fails_from_its_header_without_decoding(tmp_path):
    """A header claiming 8 hours (a sparse file: no disk used) is refused before its samples are read."""
    _write(tmp_path / 'src' / 'a.wav', 16000, 0.5, 1)
    decoded = sparse_wav(tmp_path / 'src' / 'long.wav', hours=8)  # 1.8 GB of float32 samples
    done, peak = peak_memory_of(['wav2lms', str(tmp_path / 'src'), str(tmp_path / 'lms'), '--workers', '1'],
                                timeout=120)
    assert done.returncode == 0, done.stderr
    assert f'  FAILED {tmp_path / "src" / "long.wav"}: 8.0 h of audio (28800 s) is over --max_seconds 3600; ' \
           'raise --max_seconds to read it' in done.stderr.splitlines()
    assert _npy_files(tmp_path / 'lms') == ['a.npy']
    assert peak < 1.3 * 2 ** 30 < decoded  # Python with torch alone is about 0.7 GB

    _write(tmp_path / 'src' / 'b.wav', 16000, 2.0, 1)
    report = convert_folder(tmp_path / 'src', tmp_path / 'lms', workers=1, max_seconds=1.5, progress=False)
    assert [(p.name, m.split(': ', 1)[1]) for p, m in report.failed] == [
        ('b.wav', '2.0 s of audio is over --max_seconds 1.5; raise --max_seconds to read it'),
        ('long.wav', '8.0 h of audio (28800 s) is over --max_seconds 1.5; raise --max_seconds to read it')]
    report = convert_folder(tmp_path / 'src', tmp_path / 'lms', workers=1, max_seconds=2.0, progress=False)
    assert [p.name for p in report.converted] == ['b.npy'] and [p.name for p, _ in report.failed] == ['long.wav']
    with pytest.raises(UsageError, match='--max_seconds must be more than 0 seconds, got 0'):
        main(str(tmp_path / 'src'), str(tmp_path / 'lms'), max_seconds=0)


def test_long_file_names_convert(tmp_path):
    """The longest names the file system allows still leave room for the temporary file's name."""
    names = ['n' * 251 + '.wav', 'é' * 125 + '.wav']  # 255 bytes each
    for name in names:
        _write(tmp_path / 'src' / name, 16000, 0.5, 1)
    report = convert_folder(tmp_path / 'src', tmp_path / 'lms', workers=1, progress=False)
    assert not report.failed and sorted(p.name for p in report.converted) == sorted(n[:-4] + '.npy' for n in names)


def test_a_write_error_fails_its_file_and_a_full_disk_stops_the_run(corpus, tmp_path, monkeypatch):
    dst = tmp_path / 'lms'
    dst.mkdir()
    (dst / 'a').write_text('a file where the folder a/ should be')
    report = convert_folder(corpus, dst, workers=1, progress=False)
    for (src, message), rel in zip(report.failed, ['a/b/y', 'a/x']):  # the folder a/ is needed for both
        assert (src, message) == (corpus / f'{rel}.wav', f'{corpus / rel}.wav: cannot write {dst / rel}.npy: '
                                  'a file is in the way, not a folder')
    assert _npy_files(dst) == ['odd.npy', 'z.npy']

    saves = fill_disk_after_one_save(monkeypatch, m2d.tools.wav_to_lms)
    with pytest.raises(OutputError) as e:
        main(str(corpus), str(tmp_path / 'full'), workers=1)
    assert str(e.value) == (f'cannot write {saves[1]}: no space left on device; 1 of {len(GOOD) + len(BAD)} files '
                            'converted, rerun the same command to continue')
    assert len(saves) == 2 and _npy_files(tmp_path / 'full') == [Path(saves[0]).relative_to(tmp_path / 'full')
                                                                  .as_posix()]
