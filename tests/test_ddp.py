"""DDP on CPU: two gloo processes train a tiny M2D and end with identical weights."""
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from conftest import make_lms_dataset

from m2d.checkpoint import load_checkpoint
from m2d.train.config import build_model, get_args_parser
from m2d.train.main import main


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, argv: list[str], out: str) -> None:
    """One torchrun-like process: the environment torchrun would set, then the training main()."""
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    result = main(get_args_parser().parse_args(argv))
    torch.save(result.model.state_dict(), Path(out) / f'rank{rank}.pt')


def test_two_process_ddp_keeps_ranks_in_sync(tmp_path):
    data = make_lms_dataset(tmp_path / 'data', vis=0)
    run = tmp_path / 'run'
    argv = ['--model', 'm2d_vit_tiny', '--depth', '2', '--decoder_depth', '2', '--input_size', '80x96',
            '--batch_size', '4', '--epochs', '2', '--warmup_epochs', '1', '--device', 'cpu', '--num_workers', '0',
            '--data_path', str(data), '--dataset', str(data / 'files.csv'), '--output_dir', str(run),
            '--eval_scripts', str(tmp_path), '--print_freq', '1']
    mp.spawn(_worker, args=(2, _free_port(), argv, str(tmp_path)), nprocs=2, join=True)

    a, b = torch.load(tmp_path / 'rank0.pt'), torch.load(tmp_path / 'rank1.pt')
    assert a.keys() == b.keys() and any(k.startswith('target_blocks') for k in a)
    for k in a:  # all weights, the EMA target network included
        assert torch.equal(a[k], b[k]), k
    torch.manual_seed(0)
    initial = build_model(get_args_parser().parse_args(argv)).state_dict()
    assert not torch.equal(initial['blocks.0.attn.qkv.weight'], a['blocks.0.attn.qkv.weight'])  # it trained

    ckpt = load_checkpoint(run / 'checkpoint-2.pth')
    args = ckpt['args']
    assert args.world_size == 2 and args.eff_batch_size == 2 * 4
    assert args.lr == pytest.approx(3e-4 * 8 / 256)
    assert len(ckpt['rng']) == 2  # every rank's RNG, for an exact resume
    assert not torch.equal(ckpt['rng'][0]['torch'], ckpt['rng'][1]['torch'])  # different masks per rank
    for k in a:
        assert torch.equal(ckpt['model'][k], a[k]), k
    console = (run / 'console.txt').read_text()
    assert 'Effective batch 8 = 4 per process x 1 accumulation x 2 processes; lr 9.375e-06' in console
    # 16 files / 2 ranks / batch 4 = 2 steps per epoch on each rank.
    assert 'Epoch [2/2] step [2/2]' in console and 'step [3/' not in console


def _recording_worker(rank: int, world_size: int, port: int, argv: list[str], out: str) -> None:
    """_worker, recording the sample numbers this rank trains on, per epoch, in out/samples-RANK.json."""
    import json

    from m2d.train.shards import ShardDataset
    seen = {}
    real = ShardDataset.__getitems__

    def recording(self, batches):
        seen.setdefault(self.epoch, []).extend(int(s) for s in self.plan()[batches[0]])
        return real(self, batches)

    ShardDataset.__getitems__ = recording
    _worker(rank, world_size, port, argv, out)
    (Path(out) / f'samples-{rank}.json').write_text(json.dumps(seen))


def shard_argv(tmp_path: Path, run: Path, url: bool = False) -> list[str]:
    """24 clips in shards of 5, batch 4 on each of 2 ranks: 3 steps per epoch, no clip left over. url: the
    shards as a file:// URL, which the processes fetch into their cache (as http(s):// or gs://)."""
    from test_shards import pack
    shards = pack(make_lms_dataset(tmp_path / 'data', lengths=(150, 96, 60, 300) * 6, vis=0), tmp_path / 'shards')
    return ['--model', 'm2d_vit_tiny', '--depth', '1', '--decoder_depth', '1', '--input_size', '80x64',
            '--batch_size', '4', '--epochs', '2', '--warmup_epochs', '1', '--device', 'cpu', '--num_workers', '0',
            '--shards', shards.resolve().as_uri() if url else str(shards), '--shard_cache', str(tmp_path / 'cache'),
            '--output_dir', str(run),
            '--eval_scripts', str(tmp_path), '--print_freq', '1', '--threads', '1']


def test_two_process_ddp_on_shards_sees_every_clip_once_per_epoch(tmp_path):
    import json
    argv = shard_argv(tmp_path, tmp_path / 'run', url=True)
    mp.spawn(_recording_worker, args=(2, _free_port(), argv, str(tmp_path)), nprocs=2, join=True)
    seen = [json.loads((tmp_path / f'samples-{rank}.json').read_text()) for rank in range(2)]
    for epoch in ('0', '1'):
        ranks = [seen[0][epoch], seen[1][epoch]]
        assert len(ranks[0]) == len(ranks[1]) == 12
        assert sorted(ranks[0] + ranks[1]) == list(range(24))  # every clip once, across the ranks
    assert seen[0]['0'] != seen[0]['1']  # reshuffled each epoch
    a, b = torch.load(tmp_path / 'rank0.pt'), torch.load(tmp_path / 'rank1.pt')
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert len(list((tmp_path / 'cache' / 'fetched').glob('*/shard-*.tar'))) == 5  # fetched once, shared


def test_two_nodes_started_by_torchrun_train_on_shards(tmp_path):
    """Two torchrun agents on this machine, as two nodes of one process each, rendezvous at 127.0.0.1."""
    import subprocess
    import sys
    run = tmp_path / 'run'
    argv = shard_argv(tmp_path, run)
    port = _free_port()
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': str(Path(__file__).resolve().parents[1])}
    nodes = [subprocess.Popen([sys.executable, '-m', 'torch.distributed.run', '--nnodes', '2', '--node_rank', str(n),
                               '--nproc_per_node', '1', '--master_addr', '127.0.0.1', '--master_port', str(port),
                               '-m', 'm2d', 'train', *argv], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for n in range(2)]
    try:
        outputs = [node.communicate(timeout=300)[0] for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    assert [node.returncode for node in nodes] == [0, 0], outputs
    ckpt = load_checkpoint(run / 'checkpoint-2.pth')
    assert ckpt['args'].world_size == 2 and len(ckpt['rng']) == 2
    console = (run / 'console.txt').read_text()
    assert 'Dataset: 24 clips in 5 shards' in console and 'Epoch [2/2] step [3/3]' in console
