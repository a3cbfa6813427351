"""Pre-training data: CSV listing, crop / pad / normalise, statistics, file checks."""
import numpy as np
import pytest
import torch

from m2d.errors import UsageError
from m2d.filelist import read_file_list
from m2d.train.data import (
    BackgroundNoise,
    SpectrogramDataset,
    check_files,
    compute_norm_stats,
    crop_or_pad,
    load_vis_samples,
)


def write_npy(path, T, value=None, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    x = np.full((1, 80, T), value, np.float32) if value is not None else \
        np.random.default_rng(seed).standard_normal((1, 80, T)).astype(np.float32)
    np.save(path, x)
    return x


def test_file_list_is_sorted(tmp_path):
    csv = tmp_path / 'files.csv'
    csv.write_text('file_name,other\nb/2.npy,x\na/1.npy,y\nb/1.npy,z\n')
    assert read_file_list(csv) == ['a/1.npy', 'b/1.npy', 'b/2.npy']


def test_csv_errors_are_helpful(tmp_path):
    with pytest.raises(UsageError, match='dataset CSV not found.*file_name'):
        read_file_list(tmp_path / 'nope.csv')
    bad = tmp_path / 'bad.csv'
    bad.write_text('path\na.npy\n')
    with pytest.raises(ValueError, match="no 'file_name' column.*'path'"):
        read_file_list(bad)


def test_crop_is_a_slice_from_a_valid_start(tmp_path, one_thread):
    x = write_npy(tmp_path / 'a.npy', 100)
    ds = SpectrogramDataset(['a.npy'], tmp_path, 64, (0.0, 1.0))
    starts = set()
    torch.manual_seed(0)
    for _ in range(200):
        item = ds[0].numpy()
        assert item.shape == (1, 80, 64)
        matches = [s for s in range(100 - 64 + 1) if np.array_equal(x[..., s:s + 64], item)]
        assert len(matches) == 1
        starts.add(matches[0])
    # Start in [0, T - crop): 0 included, T - crop never drawn.
    assert min(starts) == 0 and max(starts) == 100 - 64 - 1


def test_short_files_are_zero_padded_before_normalising(tmp_path):
    x = write_npy(tmp_path / 'short.npy', 40)
    mean, std = -5.0, 2.0
    item = SpectrogramDataset(['short.npy'], tmp_path, 64, (mean, std))[0].numpy()
    np.testing.assert_allclose(item[..., :40], (x - mean) / std, rtol=1e-6)
    np.testing.assert_allclose(item[..., 40:], (0 - mean) / std)  # zero in log space, then normalised
    write_npy(tmp_path / 'exact.npy', 64, value=3.0)
    np.testing.assert_allclose(SpectrogramDataset(['exact.npy'], tmp_path, 64, (mean, std))[0].numpy(), 4.0)
    assert crop_or_pad(x, 0, 64).shape == (1, 80, 64)


def test_norm_stats_over_random_crops(tmp_path):
    files = []
    for i, v in enumerate([1.0, 2.0, 3.0, 4.0]):
        write_npy(tmp_path / f'{i}.npy', 64, value=v)
        files.append(f'{i}.npy')
    mean, std, n = compute_norm_stats(files, tmp_path, 64)
    assert n == 4  # fewer files than the 10,000 crops: each file once
    assert mean == pytest.approx(2.5)
    assert std == pytest.approx(np.std([1, 2, 3, 4]), rel=1e-6)
    mean2, std2, n2 = compute_norm_stats(files, tmp_path, 64, n_crops=2, seed=1)
    assert n2 == 2 and mean2 in (1.5, 2.0, 2.5, 3.0, 3.5)
    # Its own generator: the global RNG does not move.
    state = torch.get_rng_state()
    compute_norm_stats(files, tmp_path, 32)
    assert torch.equal(state, torch.get_rng_state())


def test_missing_and_corrupt_files_are_named(tmp_path, capsys):
    write_npy(tmp_path / 'ok.npy', 50)
    (tmp_path / 'truncated.npy').write_bytes((tmp_path / 'ok.npy').read_bytes()[:200])
    np.save(tmp_path / 'wrong.npy', np.zeros((80, 50), np.float32))
    files = ['ok.npy', 'gone.npy', 'truncated.npy', 'wrong.npy']
    with pytest.raises(ValueError) as err:
        check_files(files, tmp_path, 80)
    message = str(err.value)
    assert '3 of 4 files' in message and '--skip_missing' in message
    for name, why in [('gone.npy', 'missing'), ('truncated.npy', 'unreadable'), ('wrong.npy', 'shape')]:
        assert f'{name}: {why}' in message
    assert check_files(files, tmp_path, 80, skip_missing=True) == ['ok.npy']
    assert 'WARNING: skipping 3 of 4 files' in capsys.readouterr().out
    with pytest.raises(ValueError, match='No usable files'):
        check_files(['gone.npy'], tmp_path, 80, skip_missing=True)


def test_vis_samples(tmp_path):
    write_npy(tmp_path / 'vis' / 'b.npy', 30, value=1.0)
    np.save(tmp_path / 'vis' / 'a.npy', np.full((80, 100), 3.0, np.float32))  # (F, T) is accepted too
    names, lms = load_vis_samples(tmp_path / 'vis', 64, (1.0, 2.0))
    assert names == ['a', 'b'] and lms.shape == (2, 1, 80, 64)
    assert torch.all(lms[0] == 1.0) and torch.all(lms[1, ..., :30] == 0.0) and torch.all(lms[1, ..., 30:] == -0.5)
    assert load_vis_samples(tmp_path / 'none', 64, (0.0, 1.0)) == ([], None)


def test_nan_and_inf_files_are_named_and_skippable(tmp_path, capsys):
    write_npy(tmp_path / 'ok.npy', 50)
    x = write_npy(tmp_path / 'nan.npy', 50)
    x[0, 3, 7] = np.nan
    np.save(tmp_path / 'nan.npy', x)
    x[0, 3, 7:10] = np.inf
    np.save(tmp_path / 'inf.npy', x)
    np.save(tmp_path / 'huge.npy', np.full((1, 80, 50), 3e38, np.float32))  # its sum overflows; values are finite
    files = ['ok.npy', 'nan.npy', 'inf.npy', 'huge.npy']
    with pytest.raises(ValueError) as err:
        check_files(files, tmp_path, 80)
    assert '2 of 4 files' in str(err.value)
    assert 'nan.npy: holds 1 NaN/inf values' in str(err.value) and 'inf.npy: holds 3 NaN/inf values' in str(err.value)
    assert check_files(files, tmp_path, 80, skip_missing=True) == ['ok.npy', 'huge.npy']
    assert 'WARNING: skipping 2 of 4 files' in capsys.readouterr().out


def test_file_list_problems_name_the_file(tmp_path):
    empty = tmp_path / 'empty.csv'
    empty.write_text('')
    with pytest.raises(ValueError, match=f'{empty} is empty'):
        read_file_list(empty)
    (tmp_path / 'header.csv').write_text('file_name\n')
    with pytest.raises(ValueError, match='header.csv lists no files'):
        read_file_list(tmp_path / 'header.csv')
    (tmp_path / 'list.txt').write_text('b.npy\n\na/c.npy\n')  # a plain list, one path per line
    assert read_file_list(tmp_path / 'list.txt') == ['a/c.npy', 'b.npy']


def test_paths_leaving_the_data_folder_are_rejected(tmp_path):
    csv = tmp_path / 'files.csv'
    csv.write_text('file_name\nok.npy\n../secret.npy\nsub/../ok.npy\n/etc/abs.npy\nsub/../../up.npy\n')
    with pytest.raises(ValueError) as err:
        read_file_list(csv)
    message = str(err.value)
    assert '3 file names point outside --data_path' in message
    assert 'line 3: ../secret.npy' in message and 'line 5: /etc/abs.npy' in message
    assert 'line 6: sub/../../up.npy' in message
    assert 'line 4' not in message  # sub/../ok.npy stays inside
    assert 'set --data_path to a folder' in message
    # A symlink inside the data folder may point anywhere: paths are compared as written.
    outside = tmp_path / 'elsewhere'
    write_npy(outside / 'x.npy', 50)
    data = tmp_path / 'data'
    data.mkdir()
    (data / 'linked').symlink_to(outside)
    (data / 'files.csv').write_text('file_name\nlinked/x.npy\n')
    assert check_files(read_file_list(data / 'files.csv'), data, 80) == ['linked/x.npy']


def test_background_noise_mix_is_a_power_share(tmp_path):
    """Mixing a crop with itself at any ratio leaves it unchanged (same level, same content); with
    silence-level noise the mixture is the clean crop scaled by (1 - ratio) in power."""
    x = np.random.default_rng(0).standard_normal((1, 80, 50)).astype(np.float32) - 5
    np.save(tmp_path / 'a.npy', x)
    same = BackgroundNoise(['a.npy'], tmp_path, 50, 0.3, noise_mean=-5.0)
    torch.testing.assert_close(same.mix(torch.from_numpy(x), -5.0), torch.from_numpy(x) + 5, atol=1e-5, rtol=0)
    np.save(tmp_path / 'quiet.npy', np.full((1, 80, 7), -80.0, np.float32))  # shorter than the crop: repeated
    quiet = BackgroundNoise(['quiet.npy'], tmp_path, 50, 0.25, noise_mean=0.0)
    expected = torch.from_numpy(x) + 5 + float(np.log(0.75))
    torch.testing.assert_close(quiet.mix(torch.from_numpy(x), -5.0), expected, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match='between 0 and 1'):
        BackgroundNoise(['a.npy'], tmp_path, 50, 1.0, 0.0)


def test_dataset_with_background_noise(lms_data):
    """Noise mixing changes the items, reproducibly under a seed, and keeps their shape."""
    files = read_file_list(lms_data / 'files.csv')
    clean = SpectrogramDataset(files, lms_data, 64, (-5.0, 2.0))
    noisy = SpectrogramDataset(files, lms_data, 64, (-5.0, 2.0), BackgroundNoise(files, lms_data, 64, 0.4, -5.0))
    def seeded(dataset):  # crop starts come from numpy's RNG (as published), background picks from torch's
        torch.manual_seed(1)
        np.random.seed(1)
        return dataset[3]

    a, b, c = seeded(noisy), seeded(noisy), seeded(clean)
    assert a.shape == c.shape == (1, 80, 64)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


def test_checked_files_are_remembered_and_only_changes_read_again(tmp_path, monkeypatch):
    import os

    import m2d.train.data as data
    for i in range(4):
        write_npy(tmp_path / f'{i}.npy', 50, seed=i)
    files = [f'{i}.npy' for i in range(4)]
    memory = data.checked_list_path(tmp_path / 'files.csv')
    read = []
    real = data._file_problem
    monkeypatch.setattr(data, '_file_problem', lambda path, n_mels: read.append(path.name) or real(path, n_mels))
    assert check_files(files, tmp_path, 80, remember=memory) == files
    assert sorted(read) == files and memory.name == '.files.csv.checked.npz'
    read.clear()
    assert check_files(files, tmp_path, 80, remember=memory) == files
    assert read == []  # a repeated or resumed start reads nothing unchanged
    x = write_npy(tmp_path / '2.npy', 50, seed=9)
    x[0, 0, 0] = np.nan
    np.save(tmp_path / '2.npy', x)
    os.utime(tmp_path / '2.npy', ns=(1, 1))  # changed: its size and time differ from what was checked
    with pytest.raises(ValueError, match='2.npy: holds 1 NaN/inf'):
        check_files(files, tmp_path, 80, remember=memory)
    assert read == ['2.npy']
    read.clear()
    with pytest.raises(ValueError, match='2.npy: holds 1 NaN/inf'):  # a bad file is never remembered as good
        check_files(files, tmp_path, 80, remember=memory)
    assert read == ['2.npy']
    read.clear()
    with pytest.raises(ValueError, match='4 of 4 files'):  # another n_mels: every file is read again
        check_files(files, tmp_path, 40, remember=memory)
    assert sorted(read) == files
