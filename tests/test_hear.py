"""The HEAR API module m2d.hear."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import m2d.hear as hear

pytestmark = pytest.mark.usefixtures('one_thread')
REPO = Path(__file__).resolve().parents[1]


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


@pytest.mark.parametrize('n_samples', [2400, 16000, 16000 + 321, 32000, 48000])
def test_timestamp_embeddings(model, audio_batch, n_samples):
    audio = audio_batch[:, :n_samples]
    emb, ts = hear.get_timestamp_embeddings(audio, model)
    assert emb.dtype == ts.dtype == torch.float32
    assert emb.shape[:2] == ts.shape and emb.shape[0] == 3 and emb.shape[2] == model.timestamp_embedding_size
    # HEAR: a constant hop (40 ms; it prefers 50 ms or less), each the centre of a 16-frame patch (LMS
    # frame i is centred at 10 i ms), and as many as are centred inside the audio.
    duration_ms = 1000 * n_samples / 16000
    n = int((duration_ms - 75) // 40) + 1
    assert torch.equal(ts, (75.0 + 40.0 * torch.arange(n)).expand(3, -1))
    # The embedding at 75 + 40 j ms encodes the spectrogram from LMS frame 4 j (zero-padded to one patch).
    lms = model.to_normalized_spec(audio)
    T = lms.shape[-1]
    torch.testing.assert_close(emb[:, 0::4], model.encode(audio)[:, :len(range(0, n, 4))])
    for shift in range(1, min(4, n)):
        shifted = model.encode_lms(F.pad(lms[..., 4 * shift:], (0, max(0, 16 - (T - 4 * shift)))))
        torch.testing.assert_close(emb[:, shift::4], shifted[:, :len(range(shift, n, 4))])


def test_the_official_hear_validator_passes(tiny_ckpt, tmp_path):
    """hear-validator (PyPI hearvalidator 2021.0.2, which install.sh installs without its TensorFlow) on m2d.hear.

    Its TensorFlow import only serves TensorFlow models: a stand-in module with the types it (and einops,
    which probes loaded frameworks) checks against, none of which a torch model or tensor is, takes its place.
    """
    assert importlib.util.find_spec('hearvalidator'), 'hearvalidator is not installed: run bash install.sh'
    (tmp_path / 'tensorflow.py').write_text('class Module: pass\nclass Tensor: pass\nclass Variable: pass\n')
    path = os.pathsep.join(filter(None, [str(tmp_path), str(REPO), os.environ.get('PYTHONPATH')]))
    validate = [sys.executable, '-m', 'hearvalidator.validate', 'm2d.hear', '-m', str(tiny_ckpt), '-d', 'cpu']
    done = subprocess.run(validate,
                          env={**os.environ, 'PYTHONPATH': path, 'OMP_NUM_THREADS': '1'}, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert 'Interval between timestamps is 40.0ms' in done.stdout and done.stdout.rstrip().endswith('Looks good!')


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
