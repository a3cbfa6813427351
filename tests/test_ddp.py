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
