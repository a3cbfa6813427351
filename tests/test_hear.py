"""The HEAR API module m2d.hear."""
import pytest
import torch

import m2d.hear as hear

pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.fixture(scope='module')
def model(tiny_ckpt):
    return hear.load_model(str(tiny_ckpt))


def test_model_attributes(model):
    assert isinstance(model, torch.nn.Module) and not model.training
    assert model.sample_rate == 16000
    assert model.scene_embedding_size == model.timestamp_embedding_size == 192 * 5


def test_scene_embeddings(model, audio_batch):
    emb = hear.get_scene_embeddings(audio_batch, model)
    assert emb.shape == (3, model.scene_embedding_size) and emb.dtype == torch.float32
    torch.testing.assert_close(emb, model.encode(audio_batch).mean(dim=1))


@pytest.mark.parametrize('n_samples', [2400, 16000, 16000 + 321, 48000])
def test_timestamp_embeddings(model, audio_batch, n_samples):
    audio = audio_batch[:, :n_samples]
    emb, ts = hear.get_timestamp_embeddings(audio, model)
    assert emb.dtype == ts.dtype == torch.float32
    assert emb.shape[:2] == ts.shape and emb.shape[0] == 3 and emb.shape[2] == model.timestamp_embedding_size
    hops = ts[0].diff()
    assert (hops > 0).all() and hops.max() <= 40.0  # HEAR prefers hops of 50 ms or less
    assert ts[0, 0] == 75.0 and ts.max() <= 1000 * n_samples / 16000 and torch.equal(ts[0], ts[1])
    n_lms_frames = 1 + n_samples // 160
    assert emb.shape[1] == len(range(0, n_lms_frames, 4))  # one embedding per 4 LMS frames (40 ms)


def test_coarse_timestamps_and_settings(tiny_ckpt, audio_batch):
    coarse = hear.load_model(weight_file=str(tiny_ckpt), timestamp_hop_ms=160)
    emb, ts = hear.get_timestamp_embeddings(audio_batch, coarse)
    assert emb.shape == (3, 19, 960) and ts[0, 1] - ts[0, 0] == 160.0
    assert hear.load_model(str(tiny_ckpt), cls_token=True).scene_embedding_size == 192 * 6


def test_load_model_errors(tmp_path):
    with pytest.raises(ValueError, match='needs model_file_path'):
        hear.load_model()
    with pytest.raises(FileNotFoundError):
        hear.load_model(str(tmp_path / 'm2d_vit_base-80x608p16x16-x' / 'missing.pth'))
