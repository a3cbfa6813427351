"""--device, the same for every command and function: 'auto' (cuda if available, else cpu), 'cpu', 'cuda' or
'cuda:N'."""
from typing import Optional

import torch

from m2d.errors import UsageError


def resolve_device(name: Optional[str] = 'auto', local_rank: Optional[int] = None) -> torch.device:
    """--device's value ('auto' or None: cuda if available, else cpu) -> torch.device; under torchrun
    (local_rank given) CUDA means this process's GPU, cuda:LOCAL_RANK. Raises UsageError when the name
    is not a device, or CUDA is asked for and not available."""
    if name in (None, '', 'auto'):
        name = 'cuda' if torch.cuda.is_available() else 'cpu'
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f'--device {name}: not a torch device; use auto, cpu, cuda or cuda:N') from None
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise UsageError(f'--device {name}: CUDA is not available here; use --device cpu (or auto)')
    return torch.device('cuda', local_rank) if device.type == 'cuda' and local_rank is not None else device
