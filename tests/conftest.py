"""Shared fixtures: tiny layout-faithful checkpoints and short audio, so tests run in seconds on CPU."""
from pathlib import Path

import numpy as np
import pytest
import torch

from m2d.models_mae import create_model

TINY = dict(depth=2, decoder_depth=2)


def make_checkpoint(root: Path, model: str = 'm2d_vit_tiny', input_size=(80, 208), patch_size=(16, 16),
                    seed: int = 0, wrap: bool = True, name: str = 'checkpoint-1.pth', **model_kwargs) -> Path:
    """Save a freshly initialised model in a folder named by the published format; return the file path."""
    torch.manual_seed(seed)
    kwargs = {**TINY, **model_kwargs}
    net = create_model(model, img_size=list(input_size), patch_size=list(patch_size), **kwargs)
    folder = Path(root) / f'{model}-{input_size[0]}x{input_size[1]}p{patch_size[0]}x{patch_size[1]}-000000-test'
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    torch.save({'model': net.state_dict()} if wrap else net.state_dict(), path)
    return path


@pytest.fixture(scope='session')
def tiny_ckpt(tmp_path_factory) -> Path:
    """A tiny M2D (D=192, 2 blocks, 80x208 input) checkpoint."""
    return make_checkpoint(tmp_path_factory.mktemp('ckpt'))


@pytest.fixture
def audio_batch() -> torch.Tensor:
    """Three 3-second clips at 16 kHz in [-1, 1]: [3, 48000]."""
    return torch.from_numpy(np.random.default_rng(0).uniform(-1, 1, (3, 48000)).astype(np.float32))


@pytest.fixture
def one_thread():
    """Run the test with one intra-op thread (timing-independent numerics, no oversubscription)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
