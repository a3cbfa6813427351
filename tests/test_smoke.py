import torch

from m2d.runtime_audio import RuntimeM2D


def test_runtime_encodes_tiny_checkpoint(tiny_ckpt, audio_batch):
    rt = RuntimeM2D(weight_file=str(tiny_ckpt))
    x = rt.encode(audio_batch)
    assert x.shape == (3, 19, 192 * 5)
    assert torch.isfinite(x).all()
