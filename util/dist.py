"""Distributed setup for torchrun (DDP): one process per device, configured by environment variables.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK (and MASTER_ADDR/MASTER_PORT); without them the run is
a single process and nothing is initialised.
"""
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str, dist_url: str = 'env://') -> DistInfo:
    """Join the process group torchrun describes (NCCL on CUDA, gloo on CPU); a no-op without torchrun.

    On CUDA each process uses the GPU cuda:LOCAL_RANK.
    """
    if 'RANK' not in os.environ or 'WORLD_SIZE' not in os.environ:
        return DistInfo()
    info = DistInfo(int(os.environ['RANK']), int(os.environ['WORLD_SIZE']), int(os.environ.get('LOCAL_RANK', 0)))
    if info.world_size == 1:
        return info
    cuda = device.startswith('cuda')
    if cuda:
        torch.cuda.set_device(info.local_rank)
    if not dist.is_initialized():
        dist.init_process_group('nccl' if cuda else 'gloo', init_method=dist_url,
                                rank=info.rank, world_size=info.world_size)
    return info


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over all processes (in place; returns it). Identity when not distributed."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return x


def all_gather_objects(obj: Any) -> list[Any]:
    """[obj of rank 0, obj of rank 1, ...]; [obj] when not distributed."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank src's obj on every process."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
