"""The inference encoder forward and RuntimeM2D's chunk passes against the published chunk loop."""
import pytest
import torch
from conftest import lms_batch
from einops import rearrange

from m2d.runtime import inference as encoder_inference
from m2d.runtime.inference import encode_inference
from m2d.runtime.runtime import RuntimeM2D

pytestmark = pytest.mark.usefixtures('one_thread')

D, GRID_F, W, PT = 192, 5, 208, 16  # m2d_vit_tiny at 80x208, patch 16x16


def chunk_loop(rt: RuntimeM2D, lms: torch.Tensor, return_layers: bool = False):
    """The published runtime: one forward_encoder pass per W frames (the last zero-padded, plus an
    all-padding chunk on an exact multiple), frames of padding dropped -> per-layer [B, T', D']."""
    pad = W - lms.shape[-1] % W
    x = torch.nn.functional.pad(lms, (0, pad))
    with torch.no_grad():
        per_chunk = [rt.backbone.forward_encoder(x[..., i:i + W], 0.0, return_layers=True)[0]
                     for i in range(0, x.shape[-1], W)]
    layers = []
    for per_layer in zip(*per_chunk):
        frames = [rearrange(c[:, 1:], 'b (f t) d -> b t (f d)', f=GRID_F) for c in per_layer]
        if rt.cfg.cls_token:
            frames = [torch.cat([c[:, :1].expand(-1, f.shape[1], -1), f], dim=-1) for c, f in zip(per_layer, frames)]
        layers.append(torch.cat(frames, dim=1)[:, :-(-lms.shape[-1] // PT)])
    return layers if return_layers else layers[-1]


@pytest.mark.parametrize('frames', [16, 100, 207, 208, 209, 416, 500, 833])
@pytest.mark.parametrize('batch', [1, 3])
def test_runtime_equals_chunk_loop(rt, frames, batch):
    lms = lms_batch(batch, frames)
    torch.testing.assert_close(rt.encode_lms(lms), chunk_loop(rt, lms), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize('per_pass', [1, 2, 256])
def test_return_layers_and_cls_token_equal_chunk_loop(tiny_ckpt, per_pass):
    rt = RuntimeM2D(weight_file=str(tiny_ckpt), cls_token=True, max_chunks_per_pass=per_pass)
    lms = lms_batch(3, 500)  # 208 + 208 + 84 frames: two full chunks and a tail
    got, want = rt.encode_lms(lms, return_layers=True), chunk_loop(rt, lms, return_layers=True)
    assert len(got) == len(want) == 2
    for g, w in zip(got, want):
        assert g.shape == (3, 32, D * (GRID_F + 1))
        torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-5)


def test_flat_features_keep_every_token_of_every_chunk(tiny_ckpt):
    rt = RuntimeM2D(weight_file=str(tiny_ckpt), flat_features=True)
    lms = lms_batch(2, 300)
    x = torch.nn.functional.pad(lms, (0, 2 * W - 300))
    with torch.no_grad():
        chunks = [rt.backbone.forward_encoder(x[..., i:i + W])[0][:, 1:] for i in (0, W)]
    torch.testing.assert_close(rt.encode_lms(lms), torch.cat(chunks, dim=1), atol=2e-5, rtol=1e-5)


def test_training_mode_without_mask_equals_eval(tiny_ckpt):
    rt = RuntimeM2D(weight_file=str(tiny_ckpt)).train()
    lms = lms_batch(2, 500).requires_grad_()
    x = rt.encode_lms(lms)
    x.sum().backward()
    assert lms.grad is not None and rt.backbone.blocks[-1].mlp.fc2.weight.grad is not None
    torch.testing.assert_close(x.detach(), rt.eval().encode_lms(lms.detach()), atol=2e-5, rtol=1e-5)


def test_encode_inference_equals_forward_encoder(rt):
    model, imgs = rt.backbone, lms_batch(3, W)
    with torch.no_grad():
        want = model.forward_encoder(imgs, 0.0, return_layers=True)[0]
        got = encode_inference(model, imgs, return_layers=True)
        keep = torch.tensor([0, 1, 2, 14, 40, 65])
        kept = encode_inference(model, imgs, keep=keep)
    assert len(got) == len(want) == 2
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(encode_inference(model, imgs), want[-1], atol=2e-5, rtol=1e-5)
    # Only the kept tokens' outputs; every token still took part as a key and value.
    assert kept.shape == (3, 6, D)
    torch.testing.assert_close(kept, want[-1][:, keep], atol=2e-5, rtol=1e-5)


def test_onednn_and_blas_linears_agree(rt, monkeypatch):
    """The oneDNN linears (the CPU float32 path on AMD CPUs) give F.linear's results."""
    if encoder_inference._ONEDNN_LINEAR is None:
        pytest.skip('this torch build has no oneDNN')
    imgs, keep = lms_batch(2, W), torch.tensor([0, 3, 60])
    out = {}
    for use in (True, False):
        monkeypatch.setattr(encoder_inference, 'USE_ONEDNN', use)
        with torch.no_grad():
            out[use] = encode_inference(rt.backbone, imgs, keep=keep, return_layers=True)
    for fast, plain in zip(out[True], out[False]):
        torch.testing.assert_close(fast, plain, atol=2e-5, rtol=1e-5)
    assert not all(torch.equal(a, b) for a, b in zip(out[True], out[False]))  # a different kernel did run


@pytest.mark.parametrize('setting, passes', [(0, [8, 2, 2]), (3, [3, 3, 3, 1, 2])])
def test_chunks_per_pass(tiny_ckpt, monkeypatch, setting, passes):
    """Full chunks and tail chunks go in separate passes; by default 8 chunks per pass on a CPU."""
    rt = RuntimeM2D(weight_file=str(tiny_ckpt), max_chunks_per_pass=setting)
    sizes, encode = [], rt._encode_inference

    def counting(model, chunks, *args):
        sizes.append(len(chunks))
        return encode(model, chunks, *args)
    monkeypatch.setattr(rt, '_encode_inference', counting)
    lms = lms_batch(2, 5 * W + 10)  # per clip 5 full chunks and a tail
    torch.testing.assert_close(rt.encode_lms(lms), chunk_loop(rt, lms), atol=2e-5, rtol=1e-5)
    assert sizes == passes
