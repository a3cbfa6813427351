"""RuntimeM2D: chunked encoding, feature options, loading, input checks and the published usage."""
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import lms_batch, make_checkpoint
from einops import rearrange

from m2d.runtime import inference as encoder_inference
from m2d.runtime.runtime import RuntimeM2D

pytestmark = pytest.mark.usefixtures('one_thread')

D, GRID_F, W, PT = 192, 5, 208, 16  # m2d_vit_tiny at 80x208, patch 16x16


def test_tiny_checkpoint_encodes_audio(rt, audio_batch):
    x = rt.encode(audio_batch)
    assert x.shape == (3, 19, D * GRID_F) and x.dtype == torch.float32
    assert torch.isfinite(x).all() and rt.cfg.feature_d == D * GRID_F
    assert torch.equal(rt.encode(audio_batch.numpy()), x)  # numpy input is accepted


def test_chunks_equal_encoding_each_chunk_alone(rt):
    lms = lms_batch(2, 500)  # chunks of 208 frames: 208 + 208 + 84 (+124 padding)
    padded = torch.nn.functional.pad(lms, (0, 3 * W - 500))
    with torch.no_grad():
        alone = [rt.backbone.forward_encoder(padded[..., i * W:(i + 1) * W])[0][:, 1:] for i in range(3)]
    expected = torch.cat([rearrange(a, 'b (f t) d -> b t (f d)', f=GRID_F) for a in alone], dim=1)[:, :32]
    x = rt.encode_lms(lms)
    torch.testing.assert_close(x, expected, atol=1e-5, rtol=1e-5)
    one_per_pass = RuntimeM2D(weight_file=rt.cfg.weight_file, max_chunks_per_pass=1)
    torch.testing.assert_close(one_per_pass.encode_lms(lms), x, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('frames', [16, 17, 207, 208, 209, 416, 500])
def test_padding_frames_are_dropped(rt, frames):
    x = rt.encode_lms(lms_batch(1, frames))
    assert x.shape == (1, -(-frames // PT), D * GRID_F)
    # Frames of a clip do not depend on the padding after it.
    longer = torch.cat([lms_batch(1, frames), lms_batch(1, 2 * W, seed=1)], dim=-1)
    n_full = frames // W * W // PT
    torch.testing.assert_close(rt.encode_lms(longer)[:, :n_full], x[:, :n_full], atol=1e-5, rtol=1e-5)


def test_return_layers(rt):
    lms = lms_batch(2, 300)
    layers = rt.encode_lms(lms, return_layers=True)
    assert len(layers) == 2 and all(y.shape == (2, 19, D * GRID_F) for y in layers)
    torch.testing.assert_close(layers[-1], rt.encode_lms(lms))
    assert not torch.allclose(layers[0], layers[1])


def test_cls_token_and_flat_features(tiny_ckpt):
    lms = lms_batch(2, 300)
    plain = RuntimeM2D(weight_file=str(tiny_ckpt)).encode_lms(lms)
    with_cls = RuntimeM2D(weight_file=str(tiny_ckpt), cls_token=True)
    x = with_cls.encode_lms(lms)
    assert with_cls.cfg.feature_d == D * (GRID_F + 1) and x.shape == (2, 19, D * (GRID_F + 1))
    torch.testing.assert_close(x[..., D:], plain)
    assert torch.equal(x[:, 0, :D], x[:, 5, :D])  # one [CLS] per chunk, repeated on its frames
    flat = RuntimeM2D(weight_file=str(tiny_ckpt), flat_features=True)
    y = flat.encode_lms(lms)
    assert flat.cfg.feature_d == D and y.shape == (2, 2 * 65, D)
    torch.testing.assert_close(rearrange(y[:, :65], 'b (f t) d -> b t (f d)', f=GRID_F), plain[:, :13])


def test_training_mask_encodes_all_chunks_in_one_pass(tiny_ckpt):
    rt = RuntimeM2D(weight_file=str(tiny_ckpt), training_mask=0.5, max_chunks_per_pass=1).train()
    lms = lms_batch(2, 5 * W).requires_grad_()
    for _ in range(3):  # a fresh structured mask each call; the row count differs between calls
        x = rt.encode_lms(lms)
        assert x.ndim == 3 and x.shape[0] == 2 and x.shape[2] == D and x.shape[1] % 5 == 0
        assert x.shape[1] < 5 * 65
    x.sum().backward()
    assert lms.grad is not None and rt.backbone.blocks[0].attn.qkv.weight.grad is not None
    assert rt.eval().encode_lms(lms).shape == (2, 5 * 65, D)  # no masking in eval mode


def _linear_dtypes(monkeypatch, fn):
    """fn()'s result and the dtypes the encoder's linear layers computed in."""
    seen = set()

    def recording(*args, **kwargs):
        out = linear(*args, **kwargs)
        seen.add(out.dtype)
        return out
    linear = encoder_inference._linear
    with monkeypatch.context() as m:
        m.setattr(encoder_inference, '_linear', recording)
        return fn(), seen


def test_outer_autocast_takes_effect(rt, tiny_ckpt, monkeypatch):
    lms = lms_batch(1, 300)
    fp32, dtypes = _linear_dtypes(monkeypatch, lambda: rt.encode_lms(lms))
    assert dtypes == {torch.float32}
    with torch.autocast('cpu', dtype=torch.bfloat16):
        outer, dtypes = _linear_dtypes(monkeypatch, lambda: rt.encode_lms(lms))
    assert dtypes == {torch.bfloat16} and outer.dtype == torch.float32
    assert 0 < (outer - fp32).abs().max() < 0.1
    audio = torch.rand(2, 16000) - 0.5
    with torch.autocast('cpu', dtype=torch.bfloat16):  # but the log-mel front end stays in float32
        lms_autocast = rt.to_feature(audio)
    assert lms_autocast.dtype == torch.float32 and torch.equal(lms_autocast, rt.to_feature(audio))
    own = RuntimeM2D(weight_file=str(tiny_ckpt), autocast_bf16=True)
    inner, dtypes = _linear_dtypes(monkeypatch, lambda: own.encode_lms(lms))
    assert dtypes == {torch.bfloat16} and 0 < (inner - fp32).abs().max() < 0.1


def test_scene_and_timestamp_embeddings(rt, audio_batch):
    scene = rt.get_scene_embeddings(audio_batch)
    assert scene.shape == (3, D * GRID_F)
    torch.testing.assert_close(scene, rt.encode(audio_batch).mean(dim=1))
    audio = audio_batch[:, :16000 + 321]  # 1020 ms, 103 LMS frames -> 7 patches, 6 centred inside the audio
    emb, ts = rt.get_timestamp_embeddings(audio)
    assert emb.shape == (3, 6, D * GRID_F) and ts.shape == (3, 6)
    torch.testing.assert_close(emb, rt.encode(audio)[:, :6])
    assert torch.equal(ts, (75.0 + 160.0 * torch.arange(6)).expand(3, -1))  # centres of frames 0-15, ..., 80-95


def test_timestamp_hop(rt, audio_batch):
    audio = audio_batch[:, :16000 + 321]
    coarse, _ = rt.get_timestamp_embeddings(audio)
    fine, ts = rt.get_timestamp_embeddings(audio, hop_ms=40)
    assert fine.shape[1] == ts.shape[1] == 24  # starts 0, 4, ..., 92: centres 75, 115, ..., 995 ms
    torch.testing.assert_close(fine[:, ::4], coarse, atol=1e-5, rtol=1e-5)
    assert torch.equal(ts[0], 75.0 + 40.0 * torch.arange(24))
    with pytest.raises(ValueError, match='choose one of 10, 20, 40, 80, 160'):
        rt.get_timestamp_embeddings(audio, hop_ms=50)


def test_reconstruct_and_decode_helpers(rt, tmp_path):
    lms = lms_batch(2, 300)
    loss, cropped, recons, errormap, mask = rt.reconstruct(lms, 0.7, start_frame=10)
    assert torch.isfinite(loss) and cropped.shape == (2, 1, 80, W) and recons is None and errormap is None
    assert mask.shape == (2, GRID_F, 13) and int(mask[0].sum()) == 65 - int(65 * 0.3)
    with pytest.raises(ValueError, match='needs 208 frames'):
        rt.reconstruct(lms, 0.7, start_frame=200)
    with pytest.raises(ValueError, match='spectrogram patches'):
        rt.decode_to_lms(torch.zeros(2, 66, D))
    msm = RuntimeM2D(weight_file=str(make_checkpoint(tmp_path, 'msm_mae_vit_tiny', decoder_depth=4)))
    _, _, recons, errormap, mask = msm.reconstruct(lms, 0.75)
    assert recons.shape == errormap.shape == (2, 1, 80, W) and mask.shape == (2, GRID_F, 13)
    latent, *_ = msm.backbone.forward_encoder(lms[..., :W])
    assert msm.decode_to_lms(latent.detach()).shape == (2, 1, 80, W)
    wav = msm.lms_to_wav(lms[0, :, :, :50], norm_stats=(-7.0, 4.0))
    assert wav.ndim == 1 and abs(len(wav) - 49 * 160) <= 160 and np.isfinite(wav).all()


def test_random_weights(tmp_path):
    rt = RuntimeM2D(weight_file=str(tmp_path / 'm2d_vit_tiny-80x208p16x16-random'))
    assert len(rt.backbone.blocks) == 12 and rt.encode_lms(lms_batch(1, 100)).shape == (1, 7, D * GRID_F)
    folder = RuntimeM2D(weight_file='m2d_vit_tiny-80x112p16x16-220930-mr7/random')
    assert folder.cfg.input_size == [80, 112]


@pytest.mark.parametrize('bad', [[float('nan'), 1.0], [0.0, 0.0], [1.0], 'ab'])
def test_given_norm_stats_are_checked(bad):
    with pytest.raises(ValueError, match='norm_stats must be two finite numbers'):
        RuntimeM2D(weight_file='m2d_vit_tiny-80x112p16x16-220930-mr7/random', norm_stats=bad)


def test_bare_wrapped_and_ddp_state_dicts_load_alike(tmp_path, rt):
    bare = make_checkpoint(tmp_path, wrap=False, name='bare.pth')
    state = torch.load(bare)
    ddp = bare.with_name('ddp.pth')
    torch.save({'model': {'module.' + k: v for k, v in state.items()}, 'epoch': 1}, ddp)
    lms = lms_batch(1, 100)
    for path in (bare, ddp):
        assert torch.equal(RuntimeM2D(weight_file=str(path)).encode_lms(lms), rt.encode_lms(lms))


def test_strict_loading_lists_missing_and_unexpected_keys(tmp_path):
    path = make_checkpoint(tmp_path)
    ckpt = torch.load(path)
    del ckpt['model']['blocks.1.mlp.fc2.bias']
    ckpt['model']['blocks.1.extra.weight'] = torch.zeros(3)
    ckpt['model']['norm.weight'] = torch.zeros(7)
    torch.save(ckpt, path)
    with pytest.raises(ValueError) as e:
        RuntimeM2D(weight_file=str(path))
    msg = str(e.value)
    assert 'missing keys (1): blocks.1.mlp.fc2.bias' in msg and 'unexpected keys (1): blocks.1.extra.weight' in msg
    assert 'norm.weight: checkpoint [7] vs model [192]' in msg


def test_folder_name_or_explicit_sizes(tmp_path, tiny_ckpt, rt):
    path = tmp_path / 'my_model' / 'weights.pth'
    path.parent.mkdir()
    shutil.copy(tiny_ckpt, path)
    with pytest.raises(ValueError) as e:
        RuntimeM2D(weight_file=str(path))
    assert 'my_model' in str(e.value) and 'm2d_vit_base-80x608p16x16' in str(e.value)
    assert "model='m2d_vit_base', input_size=[80, 608], patch_size=[16, 16]" in str(e.value)
    lms = lms_batch(1, 100)
    for sizes in (dict(input_size=[80, 208], patch_size=[16, 16]), dict(input_size='80x208', patch_size=16)):
        explicit = RuntimeM2D(weight_file=str(path), model='m2d_vit_tiny', **sizes)
        assert torch.equal(explicit.encode_lms(lms), rt.encode_lms(lms))
    with pytest.raises(ValueError, match='must be \\[height, width\\]'):
        RuntimeM2D(weight_file=str(path), model='m2d_vit_tiny', input_size='80by208', patch_size=16)
    with pytest.raises(ValueError, match="unknown model 'm2d_vit_huge'"):
        RuntimeM2D(weight_file=str(path), model='m2d_vit_huge', input_size=[80, 208], patch_size=[16, 16])
    with pytest.raises(TypeError, match="unknown setting 'cls'"):
        RuntimeM2D(weight_file=str(path), cls=True)


def test_missing_weight_file(tmp_path):
    with pytest.raises(FileNotFoundError, match='weight file not found'):
        RuntimeM2D(weight_file=str(tmp_path / 'm2d_vit_base-80x608p16x16-220930-mr7' / 'checkpoint-300.pth'))
    with pytest.raises(ValueError, match='needs a weight_file'):
        RuntimeM2D()


@pytest.mark.parametrize('audio, error, match', [
    (torch.zeros(2, 2, 16000), ValueError, 'mono'),
    (torch.zeros(2, 0), ValueError, 'empty'),
    (torch.zeros(1, 2000), ValueError, 'shorter than one patch'),
    (np.zeros((16000, 2), np.float32), ValueError, r'is \[samples, channels\], mix to mono first'),
    (torch.tensor([[0.1] * 8000 + [float('nan')]]), ValueError, 'NaN or inf'),
    (torch.tensor([[0.1] * 8000 + [float('inf')]]), ValueError, 'NaN or inf'),
    (torch.zeros(1, 16000, dtype=torch.int16), TypeError, 'int16 / 32768'),
    ([0.0] * 16000, TypeError, 'torch.Tensor or numpy array'),
])
def test_bad_audio_is_rejected_clearly(rt, audio, error, match):
    with pytest.raises(error, match=match):
        rt.encode(audio)


def test_bad_lms_and_silence_are_rejected_clearly(rt):
    with pytest.raises(ValueError, match='lms.unsqueeze\\(1\\)'):
        rt.encode_lms(torch.zeros(2, 80, 100))
    with pytest.raises(ValueError, match='one patch'):
        rt.encode_lms(torch.zeros(2, 1, 80, 10))
    with pytest.raises(TypeError, match='floating point'):
        rt.encode_lms(torch.zeros(2, 1, 80, 100, dtype=torch.int64))
    with pytest.raises(ValueError, match='digital silence'):
        rt.encode(torch.zeros(2, 16000))
    assert rt.encode_lms(torch.zeros(2, 1, 80, 100)).shape == (2, 7, D * GRID_F)  # constant normalised LMS is fine


PUBLISHED_QUICK_EXAMPLE = '''
from m2d.runtime.runtime import RuntimeM2D

device = torch.device('cpu')  # set 'cuda' if you run on a GPU

# Prepare your batch of audios. This is a dummy  example of three 10s  waves.
batch_audio = 2 * torch.rand((3, 10 * 16000)) - 1.0 # input range = [-1., 1]
batch_audio = batch_audio.to(device)

# Create a model with pretrained weights.
runtime = RuntimeM2D(weight_file='m2d_vit_base-80x608p16x16-220930-mr7/checkpoint-300.pth')
runtime = runtime.to(device)

# Encode raw audio into features. `encode()` will do the followings automatically:
# 1. Convert the input `batch_audio` to log-mel spectrograms (LMS).
# 2. Normalize the batch LMS with mean and std calculated from the batch.
# 3. Encode the bach LMS to features.
frame_level = runtime.encode(batch_audio)

# This example ends up with frame-level 3840-d feature vectors for 63 time frames.
# The `frame_level` will have a size of torch.Size([3, 63, 3840]).
print(frame_level.shape)

#  You can get clip-level features by taking average of time franes.
# The `clip_level` will have a size of torch.Size([3, 3840])
clip_level = torch.mean(frame_level, dim=1)
print(clip_level.shape)
'''

PUBLISHED_DATASET_NORM_EXAMPLE = '''
# Calculate statistics in advance. This is an example with 10 random waves.
means, stds = [], []
for _ in range(10):
    lms = runtime.to_feature(torch.rand((10 * 16000)).to(device))
    means.append(lms.mean())
    stds.append(lms.std())

dataset_mean, dataset_std = torch.mean(torch.stack(means)), torch.mean(torch.stack(stds))
# These can be numbers [-5.4919195, 5.0389895], for example.

# The followings are an example pipeline.

# Convert your batch audios into LMS.
batch_lms = runtime.to_feature(batch_audio)
# Normalize them.
batch_lms = (batch_lms - dataset_mean) / (dataset_std + torch.finfo().eps)
# Encode them to feame-level features.
frame_level = runtime.encode_lms(batch_lms)
#  Calculate clip-level features if needed.
clip_level = torch.mean(frame_level, dim=1)
'''

PUBLISHED_LAYERS_EXAMPLE = '''
# Getting features per layer.
y = runtime.encode_lms(torch.rand(10, 1, 80, 900), return_layers=True)
print(len(y), y[0].shape)
# --> 12 torch.Size([10, 57, 3840])

# As normal, getting finale-layer features.
y = runtime.encode_lms(torch.rand(10, 1, 80, 900), return_layers=False)
print(y.shape)
# --> torch.Size([10, 57, 3840])
'''


def test_published_readme_examples_run_verbatim(tmp_path, monkeypatch, capsys):
    # A ViT-B checkpoint with the published folder name and key layout (one block, to stay small).
    torch.manual_seed(0)
    from m2d.model.vit import create_model
    net = create_model('m2d_vit_base', img_size=[80, 608], depth=1, decoder_depth=1)
    folder = tmp_path / 'm2d_vit_base-80x608p16x16-220930-mr7'
    folder.mkdir()
    torch.save({'model': net.state_dict(), 'epoch': 300}, folder / 'checkpoint-300.pth')
    monkeypatch.chdir(tmp_path)
    scope = {'torch': torch}  # the published snippets assume `import torch` was done
    exec(PUBLISHED_QUICK_EXAMPLE, scope)
    assert capsys.readouterr().out.split('\n')[:2] == ['torch.Size([3, 63, 3840])', 'torch.Size([3, 3840])']
    exec(PUBLISHED_DATASET_NORM_EXAMPLE, scope)
    assert scope['clip_level'].shape == (3, 3840) and torch.isfinite(scope['clip_level']).all()
    exec(PUBLISHED_LAYERS_EXAMPLE, scope)
    assert capsys.readouterr().out.split('\n')[:2] == ['1 torch.Size([10, 57, 3840])', 'torch.Size([10, 57, 3840])']
    assert os.getcwd() == str(tmp_path) and Path('m2d_vit_base-80x608p16x16-220930-mr7').is_dir()
