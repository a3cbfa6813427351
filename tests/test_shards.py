"""Shards (m2d pack, --shards): packing, the index, checks of bad shards, remote fetching, each rank's epoch
plan, crops, training, and an exact mid-epoch resume."""
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset
from conftest import make_lms_dataset

import m2d.train.engine as engine
from m2d.cli import main as m2d_main
from m2d.errors import ShardError
from m2d.filelist import read_file_list
from m2d.tools.pack import npy_loader, pack_folder
from m2d.train.config import get_args_parser
from m2d.train.main import main
from m2d.train.shard_set import ShardFiles, open_shards
from m2d.train.shards import ShardDataset, epoch_batches
from util.dist import DistInfo


class Npy:  # a picklable make_loader for pack_folder
    def __init__(self, root):
        self.root = str(root)

    def __call__(self):
        return npy_loader(self.root)


def pack(data: Path, out: Path, *extra: str) -> Path:
    assert m2d_main(['pack', str(data / 'files.csv'), str(out), '--data_path', str(data), '--workers', '1',
                     '--shard_clips', '5', *extra]) == 0
    return out


def sources_by_position(out: Path) -> dict[int, str]:
    """Sample number in the set -> the source file name."""
    names = []
    for record in json.loads((out / 'index.json').read_text())['shards']:
        names += json.loads((out / record['name'].replace('.tar', '.json')).read_text())['names']
    return dict(enumerate(names))


def test_pack_stores_every_clip_readable_by_offset_and_by_webdataset(tmp_path):
    data = make_lms_dataset(tmp_path / 'data', vis=0)
    out = pack(data, tmp_path / 'shards', '--dtype', 'float32')
    shards = open_shards(str(out), 80)
    assert len(shards) == 16 and list(shards.counts) == [5, 5, 5, 1]
    files = ShardFiles(shards, tmp_path / 'cache')
    names = sources_by_position(out)
    assert sorted(names.values()) == read_file_list(data / 'files.csv')
    assert list(names.values()) != read_file_list(data / 'files.csv')  # a seeded random order
    for i, name in names.items():
        assert np.array_equal(files.clip(i), np.load(data / name)), name
    values = np.concatenate([np.load(data / n).ravel() for n in names.values()]).astype(np.float64)
    assert shards.norm_stats == pytest.approx([values.mean(), values.std()])
    # Standard WebDataset shards: any WebDataset pipeline reads them.
    urls = [str(out / r['name']) for r in shards.index['shards']]
    read = {s['__key__']: s['npy'] for s in webdataset.WebDataset(urls, shardshuffle=False).decode()}
    assert len(read) == 16 and np.array_equal(read['000000007'], np.load(data / names[7]))

    half = pack(data, tmp_path / 'half', '--dtype', 'float16')  # within float16's rounding
    half_files = ShardFiles(open_shards(str(half), 80), tmp_path / 'cache')
    for i, name in names.items():
        x = np.load(data / name)
        assert half_files.clip(i).dtype == np.float16
        np.testing.assert_allclose(half_files.clip(i).astype(np.float32), x, rtol=2 ** -11, atol=0)
    assert (out / 'shard-000000.tar').stat().st_size > 1.8 * (half / 'shard-000000.tar').stat().st_size


def test_pack_reports_bad_files_goes_on_and_resumes_after_an_interruption(tmp_path):
    data = make_lms_dataset(tmp_path / 'data', vis=0)
    np.save(data / 'lms' / 'nan.npy', np.full((1, 80, 50), np.nan, np.float32))
    np.save(data / 'lms' / 'flat.npy', np.zeros((80, 50), np.float32))
    names = read_file_list(data / 'files.csv') + ['lms/gone.npy', 'lms/nan.npy', 'lms/flat.npy']
    load = npy_loader(data)
    calls = []

    def interrupted_loader():
        def loader(name):
            calls.append(name)
            if len(calls) == 8:  # in the second shard
                raise KeyboardInterrupt
            return load(name)
        return loader

    out = tmp_path / 'shards'
    with pytest.raises(KeyboardInterrupt, match='1 of 4 shards packed'):
        pack_folder(names, out, interrupted_loader, shard_clips=5, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ['shard-000000.json', 'shard-000000.tar']  # no partial shard
    first = (out / 'shard-000000.tar').stat().st_mtime_ns

    report = pack_folder(names, out, Npy(data), shard_clips=5, progress=False)
    assert report.reused == 1 and report.packed == 3
    assert (out / 'shard-000000.tar').stat().st_mtime_ns == first  # kept, not written again
    assert sorted(report.failed) == [['lms/flat.npy', 'shape (80, 50), expected (1, 80, T)'],
                                     ['lms/gone.npy', 'missing'], ['lms/nan.npy', 'holds 4000 NaN/inf values']]
    assert len(open_shards(str(out), 80)) == 16
    fresh = pack_folder(names, tmp_path / 'fresh', Npy(data), shard_clips=5, progress=False)
    assert [r['sha256'] for r in fresh.shards] == [r['sha256'] for r in report.shards]  # as if never interrupted

    # A fixed file is packed on the next run: shards with failures are redone, the others kept.
    np.save(data / 'lms' / 'gone.npy', np.ones((1, 80, 30), np.float32))
    again = pack_folder(names, out, Npy(data), shard_clips=5, progress=False)
    assert again.packed >= 1 and again.reused >= 1 and len(again.failed) == 2


def test_epoch_plan_gives_each_clip_once_across_ranks_from_each_ranks_own_shards():
    counts = np.array([5, 5, 5, 1, 7, 6, 4])  # 33 clips
    plans = [epoch_batches(counts, seed=3, epoch=1, world_size=2, rank=r, batch_size=4, shuffle_shards=2)
             for r in range(2)]
    assert [p.shape for p in plans] == [(4, 4), (4, 4)]  # 33 // 8 = 4 batches of 4 per rank
    seen = np.concatenate([p.ravel() for p in plans])
    assert len(set(seen)) == 32 and seen.min() >= 0 and seen.max() < 33  # once each; one clip sits out
    starts = np.concatenate([[0], np.cumsum(counts)])
    shard_sets = [set(np.searchsorted(starts, p.ravel(), side='right') - 1) for p in plans]
    assert len(shard_sets[0] & shard_sets[1]) <= 1  # contiguous blocks: at most a boundary shard is shared
    again = epoch_batches(counts, seed=3, epoch=1, world_size=2, rank=0, batch_size=4, shuffle_shards=2)
    assert np.array_equal(again, plans[0])
    assert not np.array_equal(epoch_batches(counts, 3, 2, 2, 0, 4, 2), plans[0])  # reshuffled each epoch
    assert not np.array_equal(epoch_batches(counts, 4, 1, 2, 0, 4, 2), plans[0])


def test_crops_are_drawn_as_published_and_seeded_per_batch(tmp_path):
    data = tmp_path / 'data'
    (data / 'lms').mkdir(parents=True)
    x = np.random.default_rng(0).standard_normal((1, 80, 100)).astype(np.float32)
    for i in range(4):
        np.save(data / 'lms' / f'{i}.npy', x if i else x[..., :40])  # clip 0 is shorter than the crop
    (data / 'files.csv').write_text('file_name\n' + '\n'.join(f'lms/{i}.npy' for i in range(4)) + '\n')
    out = pack(data, tmp_path / 'shards', '--dtype', 'float32')
    dataset = ShardDataset(open_shards(str(out), 80), 64, (0.0, 1.0), seed=0, info=DistInfo(), batch_size=2,
                           cache=tmp_path / 'cache')
    names = sources_by_position(out)
    starts = set()
    for epoch in range(30):
        dataset.epoch = epoch
        for batch in range(2):
            items = dataset.__getitems__([batch])
            assert all(torch.equal(a, b) for a, b in zip(items, dataset.__getitems__([batch])))  # seeded per batch
            for sample, item in zip(dataset.plan()[batch], items):
                item = item.numpy()
                if names[int(sample)] == 'lms/0.npy':  # right zero-padded
                    assert np.array_equal(item[..., :40], x[..., :40]) and not item[..., 40:].any()
                    continue
                found = [s for s in range(100 - 64 + 1) if np.array_equal(x[..., s:s + 64], item)]
                assert len(found) == 1
                starts.add(found[0])
    assert min(starts) == 0 and max(starts) == 100 - 64 - 1  # np.random.randint(T - crop): T - crop never


def test_bad_shards_are_named_in_one_line_before_training_or_when_read(tmp_path, capsys):
    data = make_lms_dataset(tmp_path / 'data', vis=0)
    out = pack(data, tmp_path / 'shards')
    shard1 = out / 'shard-000001.tar'
    original = shard1.read_bytes()

    def error(n_mels=80) -> str:
        with pytest.raises(ShardError) as e:
            open_shards(str(out), n_mels)
        assert '\n' not in str(e.value)
        return str(e.value)

    shard1.unlink()
    assert 'shard-000001.tar missing' in error()
    shard1.write_bytes(original[:-1000])
    assert 'shard-000001.tar truncated or replaced' in error()
    assert 'holds (1, 80, T) clips; this run needs (1, 128, T)' in error(128)

    corrupt = bytearray(original)
    corrupt[2000] ^= 0xFF
    shard1.write_bytes(bytes(corrupt))  # same size: found when first read, by its checksum
    files = ShardFiles(open_shards(str(out), 80), tmp_path / 'cache')
    with pytest.raises(ShardError, match=r'shard-000001.tar: checksum mismatch .* pack it again'):
        files.clip(5)
    assert files.clip(0).shape[:2] == (1, 80)  # the other shards read on

    # In training, from a DataLoader worker: one line naming the shard and how to continue.
    argv = ['train', '--model', 'm2d_vit_tiny', '--depth', '1', '--decoder_depth', '1', '--input_size', '80x64',
            '--batch_size', '8', '--epochs', '1', '--device', 'cpu', '--num_workers', '1', '--shards', str(out),
            '--shard_cache', str(tmp_path / 'cache'), '--output_dir', str(tmp_path / 'run'), '--threads', '1',
            '--eval_scripts', str(tmp_path)]
    capsys.readouterr()
    assert m2d_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'shard-000001.tar: checksum mismatch' in err[0] and 'in epoch 1' in err[0]


def test_shards_are_checked_once_and_remembered(tmp_path, monkeypatch):
    data = make_lms_dataset(tmp_path / 'data', vis=0)
    out = pack(data, tmp_path / 'shards')
    shards = open_shards(str(out), 80)
    hashed = []
    real_sha256 = hashlib.sha256
    monkeypatch.setattr('m2d.train.shard_set.hashlib.sha256', lambda *a: hashed.append(1) or real_sha256(*a))
    ShardFiles(shards, tmp_path / 'cache').clip(0)
    assert len(hashed) == 1
    ShardFiles(shards, tmp_path / 'cache').clip(1)  # another process, the same shard: remembered
    assert len(hashed) == 1
    os.utime(out / 'shard-000000.tar', ns=(1, 1))  # changed on disk: checked again
    ShardFiles(shards, tmp_path / 'cache').clip(2)
    assert len(hashed) == 2


def test_a_remote_set_is_fetched_into_the_cache_and_checked(tmp_path):
    data = make_lms_dataset(tmp_path / 'data', vis=0)
    out = pack(data, tmp_path / 'shards', '--dtype', 'float32')
    url = (out.resolve()).as_uri()  # file://...: fetched through webdataset's gopen, as http(s):// or gs://
    shards = open_shards(url, 80)
    assert shards.remote and len(shards) == 16
    files = ShardFiles(shards, tmp_path / 'cache')
    names = sources_by_position(out)
    assert np.array_equal(files.clip(12), np.load(data / names[12]))
    assert [p.name for p in files.fetched.glob('*.tar')] == ['shard-000002.tar']
    files.prefetch([0, 1])
    files.prefetching.join()
    assert sorted(p.name for p in files.fetched.glob('*.tar')) == [f'shard-00000{i}.tar' for i in range(3)]

    corrupt = bytearray((out / 'shard-000003.tar').read_bytes())
    corrupt[1500] ^= 1
    (out / 'shard-000003.tar').write_bytes(bytes(corrupt))
    with pytest.raises(ShardError, match='shard-000003.tar: checksum mismatch'):
        files.clip(15)
    assert not (files.fetched / 'shard-000003.tar').exists()  # nothing half-fetched or wrong is kept
    with pytest.raises(ValueError, match='no index.json there; make a shard set with m2d pack'):
        open_shards((tmp_path / 'nowhere').as_uri(), 80)


def tiny_argv(run: Path, *extra: str) -> list[str]:
    """A tiny model, batch 8 (on 24 clips: 3 steps per epoch), its run folder `run`."""
    return ['--model', 'm2d_vit_tiny', '--depth', '1', '--decoder_depth', '1', '--input_size', '80x64',
            '--batch_size', '8', '--epochs', '2', '--warmup_epochs', '1', '--device', 'cpu', '--num_workers', '0',
            '--output_dir', str(run), '--print_freq', '1', '--eval_scripts', str(run.parent / 'none'),
            '--threads', '1', *extra]


@pytest.mark.parametrize('source', ['shards', 'files'])
def test_a_run_resumed_part_way_through_an_epoch_sees_the_same_samples_and_ends_the_same(tmp_path, monkeypatch,
                                                                                        source):
    data = make_lms_dataset(tmp_path / 'data', lengths=(150, 96, 60, 300) * 6, vis=0)
    if source == 'shards':
        where = ['--shards', str(pack(data, tmp_path / 'shards', '--dtype', 'float16')),
                 '--shard_cache', str(tmp_path / 'cache')]
    else:  # the published path: the same order, and the same crops with --num_workers 0
        where = ['--data_path', str(data), '--dataset', str(data / 'files.csv')]
    batches, stop_at = [], [None]
    real_step = engine.forward_backward

    def recording_step(model, samples, *args, **kwargs):
        if len(batches) == stop_at[0]:
            raise KeyboardInterrupt
        batches.append(samples.clone())
        return real_step(model, samples, *args, **kwargs)

    monkeypatch.setattr(engine, 'forward_backward', recording_step)
    whole = main(get_args_parser().parse_args(tiny_argv(tmp_path / 'whole', *where)))
    expected, batches[:] = list(batches), []

    run = tmp_path / 'stopped'
    stop_at[0] = 4  # in step 2 of epoch 2, after the checkpoint of its first step
    with pytest.raises(KeyboardInterrupt, match='checkpoint-last.pth'):
        main(get_args_parser().parse_args(tiny_argv(run, *where, '--save_every_steps', '1')))
    stop_at[0] = None
    before = len(batches)
    workers = ['--num_workers', '2'] if source == 'shards' else []  # the shard order does not depend on workers
    resumed = main(get_args_parser().parse_args(tiny_argv(run, *where, '--resume',
                                                          str(run / 'checkpoint-last.pth'), *workers)))
    assert before == 4 and len(batches) == 6
    for a, b in zip(expected, batches):
        assert torch.equal(a, b)
    for key, value in whole.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
    assert 'Resuming epoch 2 at step 2 of 3' in (run / 'console.txt').read_text()
    assert not (run / 'checkpoint-last.pth').exists()  # replaced by checkpoint-2.pth at the end


def test_a_step_checkpoint_counts_as_the_latest_checkpoint_of_its_folder(tmp_path):
    from m2d.errors import RunFolderError
    from m2d.train.run_folder import check_ownership
    (tmp_path / 'checkpoint-1.pth').write_bytes(b'x')
    (tmp_path / 'checkpoint-last.pth').write_bytes(b'x')
    with pytest.raises(RunFolderError, match='continue that run with --resume .*checkpoint-last.pth'):
        check_ownership(tmp_path, None, overwrite=False)  # a new run would overwrite it
    with pytest.raises(RunFolderError, match=r'later checkpoints than checkpoint-1.pth \(checkpoint-last.pth\)'):
        check_ownership(tmp_path, tmp_path / 'checkpoint-1.pth', overwrite=False)
    assert check_ownership(tmp_path, tmp_path / 'checkpoint-last.pth', overwrite=False) == []


def test_wav2lms_writes_shards_straight_from_audio(tmp_path, capsys):
    from test_wav_to_lms import _write

    from m2d.audio.lms import LogMelSpectrogram
    from m2d.tools.wav_to_lms import audio_to_lms
    src = tmp_path / 'wav'
    for i, (name, seconds) in enumerate([('a.wav', 0.5), ('sub/b.wav', 1.0), ('c.wav', 0.3)]):
        _write(src / name, 16000, seconds, 1, seed=i)
    (src / 'broken.wav').write_bytes(b'RIFF not audio')
    out = tmp_path / 'shards'
    assert m2d_main(['wav2lms', str(src), str(out), '--shards', '--workers', '0']) == 2
    assert '--workers must be at least 1, got 0' in capsys.readouterr().err and not out.exists()
    assert m2d_main(['wav2lms', str(src), str(out), '--shards', '--workers', '1', '--shard_clips', '2']) == 0
    shards = open_shards(str(out), 80)
    assert len(shards) == 3 and shards.index['dtype'] == 'float32'
    files, to_lms = ShardFiles(shards, tmp_path / 'cache'), LogMelSpectrogram()
    for i, name in sources_by_position(out).items():
        assert np.array_equal(files.clip(i), audio_to_lms(src / name, to_lms)[0]), name
    failed = [f for r in shards.index['shards'] for f in json.loads((out / r['name'].replace('.tar', '.json')
                                                                       ).read_text())['failed']]
    assert [name for name, _ in failed] == ['broken.wav']


def test_a_limited_cache_keeps_the_recently_used_shards_and_fetches_evicted_ones_again(tmp_path):
    data = make_lms_dataset(tmp_path / 'data', vis=0)
    out = pack(data, tmp_path / 'shards', '--dtype', 'float32')
    shards = open_shards(out.resolve().as_uri(), 80)
    size = max(r['bytes'] for r in shards.index['shards'])
    files = ShardFiles(shards, tmp_path / 'cache', cache_limit=2 * size)
    names = sources_by_position(out)
    for i in (0, 5, 1, 10):  # shards 0, 1, 0 again (the most recently used now), 2: shard 1 goes
        assert np.array_equal(files.clip(i), np.load(data / names[i]))
    assert sorted(p.name for p in files.fetched.glob('*.tar')) == ['shard-000000.tar', 'shard-000002.tar']
    assert np.array_equal(files.clip(6), np.load(data / names[6]))  # this process still has it open
    other = ShardFiles(shards, tmp_path / 'cache', cache_limit=2 * size)  # another process: fetches it again
    assert np.array_equal(other.clip(6), np.load(data / names[6]))
    assert sorted(p.name for p in files.fetched.glob('*.tar')) == ['shard-000001.tar', 'shard-000002.tar']
