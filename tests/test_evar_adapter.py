"""for_evar/ar_m2d.py inside an EVAR-like checkout (tests/evar_stub), linked as docs/evaluation.md sets it up."""
import datetime
import importlib
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from m2d.errors import UnsafeCheckpointError
from m2d.runtime.runtime import RuntimeM2D

REPO = Path(__file__).resolve().parents[1]
STUB = REPO / 'tests' / 'evar_stub' / 'evar'


@pytest.fixture(scope='module')
def evar(tmp_path_factory):
    """An 'evar' checkout beside a 'for_evar' folder, linked as docs/evaluation.md says; yields evar.ar_m2d."""
    root = tmp_path_factory.mktemp('m2d_repo')
    (root / 'for_evar').symlink_to(REPO / 'for_evar')
    pkg = root / 'evar' / 'evar'
    pkg.mkdir(parents=True)
    (root / 'evar' / 'config').mkdir()
    for name in ('__init__.py', 'ar_base.py'):
        (pkg / name).symlink_to(STUB / name)
    os.symlink('../../for_evar/ar_m2d.py', pkg / 'ar_m2d.py')
    os.symlink('../../for_evar/m2d.yaml', root / 'evar' / 'config' / 'm2d.yaml')
    sys.path.insert(0, str(root / 'evar'))
    try:
        module = importlib.import_module('evar.ar_m2d')
        module.CONFIG = root / 'evar' / 'config' / 'm2d.yaml'
        yield module
    finally:
        sys.path.remove(str(root / 'evar'))
        for name in [n for n in sys.modules if n == 'evar' or n.startswith('evar.')]:
            del sys.modules[name]


def make_cfg(evar, weight, **overrides):
    from evar.ar_base import EasyDict
    cfg = EasyDict(yaml.safe_load(evar.CONFIG.read_text()))
    cfg.update(weight_file=str(weight), **overrides)
    return cfg


def loader(n=4, seconds=1.5, batch=2):
    audio = torch.from_numpy(np.random.default_rng(1).uniform(-1, 1, (n, int(seconds * 16000)))).float()
    data = torch.utils.data.TensorDataset(audio, torch.zeros(n, dtype=torch.long))
    return torch.utils.data.DataLoader(data, batch_size=batch), audio


def test_config_holds_the_published_settings(evar):
    cfg = yaml.safe_load(evar.CONFIG.read_text())
    assert cfg['audio_repr'] == 'ar_m2d.AR_M2D'
    assert (cfg['feature_d'], cfg['output_layers'], cfg['training_mask'], cfg['cls_token']) == (3840, [-1], 0.0, False)
    assert (cfg['n_fft'], cfg['window_size'], cfg['hop_size'], cfg['n_mels'], cfg['f_min'], cfg['f_max']) == \
        (400, 400, 160, 80, 50, 8000)
    assert (cfg['batch_size'], cfg['lr_lineareval'], cfg['early_stop_epochs']) == (128, 0.00003, 20)
    assert (cfg['ft_lr'], cfg['ft_bs'], cfg['ft_epochs'], cfg['ft_freq_mask'], cfg['ft_time_mask'], cfg['ft_rrc']) == \
        (2.0, 128, 200, 30, 192, True)


def test_shapes_and_dataset_norm_stats(evar, tiny_ckpt, one_thread):
    cfg = make_cfg(evar, tiny_ckpt)
    ar = evar.AR_M2D(cfg).eval()
    assert cfg.feature_d == ar.cfg.feature_d == 192 * 5
    dl, audio = loader()
    ar.precompute('cpu', dl)
    lms = RuntimeM2D(weight_file=str(tiny_ckpt)).to_feature(audio)
    torch.testing.assert_close(ar.norm_stats, torch.stack([lms.mean(), lms.std()]), rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        frames, emb = ar.encode_frames(audio[:2]), ar(audio[:2])
    assert frames.shape == (2, 960, 10) and emb.shape == (2, 960)  # 151 frames -> ceil(151 / 16) = 10
    expected = ar.runtime.encode_lms((lms[:2] - lms.mean()) / lms.std())
    torch.testing.assert_close(frames, expected.transpose(1, 2), rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(emb, frames.mean(-1))


def test_output_layers_are_stacked(evar, tiny_ckpt, one_thread):
    dl, audio = loader()
    ar = evar.AR_M2D(make_cfg(evar, tiny_ckpt, output_layers=[-1, 0])).eval()
    ar.precompute('cpu', dl)
    assert ar.cfg.feature_d == 2 * 960
    with torch.no_grad():
        frames = ar.encode_frames(audio[:2])
    layers = ar.runtime.encode_lms(evar.normalize_spectrogram(ar.norm_stats, ar.runtime.to_feature(audio[:2])),
                                   return_layers=True)
    torch.testing.assert_close(frames, torch.cat([layers[-1], layers[0]], -1).transpose(1, 2))
    with pytest.raises(ValueError, match='output_layers'):
        evar.AR_M2D(make_cfg(evar, tiny_ckpt, output_layers=[5]))


def test_augmentation_only_in_training(evar, tiny_ckpt, one_thread):
    dl, audio = loader()
    ar = evar.AR_M2D(make_cfg(evar, tiny_ckpt))
    ar.precompute('cpu', dl)
    calls = []
    ar.set_augment_tf_feature_fn(lambda x: calls.append(x.shape) or torch.zeros_like(x))
    ar.eval()
    with torch.no_grad():
        clean = ar(audio[:2])
    assert not calls
    ar.train()
    augmented = ar(audio[:2])
    assert calls == [(2, 1, 80, 151)] and augmented.requires_grad
    assert not torch.allclose(clean, augmented)


def test_training_mask_masks_tokens_only_in_training(evar, tiny_ckpt, one_thread):
    dl, audio = loader()
    ar = evar.AR_M2D(make_cfg(evar, tiny_ckpt, training_mask=0.5))
    ar.precompute('cpu', dl)
    assert ar.cfg.feature_d == 192  # flat token features
    ar.eval()
    with torch.no_grad():
        full = ar.encode_frames(audio[:2])
    ar.train()
    masked = ar.encode_frames(audio[:2])
    assert full.shape == (2, 192, 5 * 13)  # all tokens of the one 208-frame chunk
    assert masked.shape[:2] == (2, 192) and 0 < masked.shape[2] < full.shape[2]


def test_batch_norm_stats_variant_and_missing_precompute(evar, tiny_ckpt, one_thread):
    _, audio = loader()
    ar = evar.AR_M2D_BatchNormStats(make_cfg(evar, tiny_ckpt, audio_repr='ar_m2d.AR_M2D_BatchNormStats')).eval()
    ar.precompute('cpu', None)
    with torch.no_grad():
        torch.testing.assert_close(ar(audio[:2]), ar.runtime.encode(audio[:2]).mean(1))
    with pytest.raises(RuntimeError, match='precompute'):
        evar.AR_M2D(make_cfg(evar, tiny_ckpt))(audio[:2])


def test_crafted_weight_file_is_refused(evar, tiny_ckpt, tmp_path):
    from test_checkpoint import WritesMarker, resave
    marker = tmp_path / 'MARKER'
    path = resave(tiny_ckpt, tmp_path / tiny_ckpt.parent.name / 'checkpoint-1.pth', args=WritesMarker(marker))
    with pytest.raises(UnsafeCheckpointError, match='trust_checkpoint=True'):
        evar.AR_M2D(make_cfg(evar, path))
    assert not marker.exists()
    dated = resave(tiny_ckpt, tmp_path / 'dated' / tiny_ckpt.parent.name / 'checkpoint-1.pth',
                   saved_on=datetime.date.today())
    assert evar.AR_M2D(make_cfg(evar, dated, trust_checkpoint=True)).cfg.feature_d == 960
