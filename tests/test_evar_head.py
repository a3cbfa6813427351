"""This repository as EVAR HEAD's `external/m2d`: the calls EVAR HEAD's own evar/ar_m2d.py (AR_M2D,
AR_M2D_CLAP) and its config/m2d.yaml make on RuntimeM2D, replayed against the runtime.

head_wrapper() below is our stand-in written from those calls (it is not EVAR's code): construct
RuntimeM2D(cfg=evar_cfg, weight_file=cfg.weight_file), adopt runtime.cfg as the wrapper's cfg, take
[cfg.mean, cfg.std] as the normalisation stats when set, encode to_normalized_spec -> encode_lms (with
return_layers for other output_layers), and for CLAP project_audio / encode_clap_text.
tests/reference/run_evar_head_wrapper.py runs EVAR's real file where it is at hand.
"""
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_checkpoint

from m2d.runtime.runtime import RuntimeM2D

pytestmark = pytest.mark.usefixtures('one_thread')

# EVAR HEAD's config/m2d.yaml settings (m2d_clap.yaml: AR_M2D_CLAP, flat_features True, no mean/std),
# plus what EVAR's make_cfg adds.
HEAD_CONFIG = dict(audio_repr='ar_m2d.AR_M2D', weight_file='m2d_vit_base-80x208p16x16p16k-random/random',
                   feature_d=3840, sample_rate=16000, n_fft=400, window_size=400, hop_size=160, n_mels=80, f_min=50,
                   f_max=8000, window='hanning', mean=-7.1, std=4.2, output_layers=[-1], encoder_only=True,
                   dur_frames=None, freeze_embed=None, flat_features=False, batch_size=128, training_mask=0.0,
                   task_name='cremad', return_filename=False, unit_samples=40000)


@pytest.fixture(scope='module', autouse=True)
def evar_stub():
    """EVAR's evar.ar_base (tests/evar_stub) importable while this module's tests run."""
    sys.path.insert(0, str(Path(__file__).parent / 'evar_stub'))
    try:
        yield
    finally:
        sys.path.remove(str(Path(__file__).parent / 'evar_stub'))
        for name in [n for n in sys.modules if n == 'evar' or n.startswith('evar.')]:
            del sys.modules[name]


def evar_cfg(**overrides):
    from evar.ar_base import EasyDict
    cfg = EasyDict({**HEAD_CONFIG, **overrides})
    if cfg.get('mean') is None:  # EVAR's make_cfg: stats absent from the yaml become None
        cfg['mean'] = cfg['std'] = None
    return cfg


def head_wrapper(cfg):
    """An AR_M2D / AR_M2D_CLAP stand-in: the call sequence of EVAR HEAD's wrapper (module docstring)."""
    from evar.ar_base import BaseCLAP, normalize_spectrogram

    class HeadWrapper(BaseCLAP):
        def __init__(self, cfg):
            super().__init__(cfg=cfg)
            self.runtime = RuntimeM2D(cfg=cfg, weight_file=cfg.weight_file)
            self.runtime.eval()
            self.cfg = self.runtime.cfg

        def precompute(self, device, data_loader):
            assert self.cfg.mean and self.cfg.std, 'EVAR HEAD would compute dataset stats with a to_feature it lacks'
            self.norm_stats = [self.cfg.mean, self.cfg.std]

        def several_layers(self):
            return self.cfg.output_layers is None or self.cfg.output_layers != [-1]

        def encode_frames(self, batch_audio):
            x = self.augment_if_training(self.runtime.to_normalized_spec(batch_audio))
            features = self.runtime.encode_lms(x, return_layers=self.several_layers())
            if self.several_layers():
                features = torch.cat([features[i] for i in self.cfg.output_layers], dim=-1)
            return features.transpose(1, 2)

        def encode_frames_lms(self, batch_lms):
            x = self.augment_if_training(normalize_spectrogram(self.norm_stats, batch_lms))
            layers = self.runtime.encode_lms(x, return_layers=True)
            return torch.cat([layers[i] for i in self.cfg.output_layers], dim=-1).transpose(1, 2)

        def forward(self, batch_audio):
            return self.encode_frames(batch_audio).mean(dim=-1)

        def encode_audio(self, batch_audio):
            return self.runtime.project_audio(self.encode_frames(batch_audio).transpose(1, 2))

        def encode_text(self, batch_text):
            return self.runtime.encode_clap_text(batch_text)

    return HeadWrapper(cfg)


def test_head_config_and_calls_with_a_first_release_checkpoint(tiny_ckpt):
    cfg = evar_cfg(weight_file=str(tiny_ckpt))
    ar = head_wrapper(cfg)
    # The runtime wrote what EVAR reads afterwards into EVAR's own cfg; EVAR's other keys stay readable.
    assert (cfg.feature_d, cfg.mean, cfg.std, cfg.input_size) == (960, -7.1, 4.2, [80, 208])
    assert ar.cfg.return_filename is False and ar.cfg.task_name == 'cremad' and ar.runtime.backbone.encoder_only
    ar.precompute('cpu', None)
    audio = torch.zeros(2, 40000).uniform_(-1, 1)
    with torch.no_grad():
        frames = ar.encode_frames(audio)
    lms = (ar.runtime.to_feature(audio) + 7.1) / 4.2  # fixed stats, as EVAR HEAD's M2D runtime normalises
    assert frames.shape == (2, 960, 16)
    torch.testing.assert_close(frames, ar.runtime.encode_lms(lms).transpose(1, 2))
    torch.testing.assert_close(ar(audio), frames.mean(-1))
    assert ar.runtime.cfg.last_chunk == 'trim'  # 251 LMS frames: a chunk of 208, then 43 -> 48 alone
    torch.testing.assert_close(frames[..., 13:], ar.runtime.encode_lms(lms[..., 208:]).transpose(1, 2))
    # Several layers, through audio and through precomputed LMS.
    ar.cfg.extra['output_layers'] = [-1, 0]
    with torch.no_grad():
        stacked, from_lms = ar.encode_frames(audio), ar.encode_frames_lms(ar.runtime.to_feature(audio))
    assert stacked.shape == (2, 2 * 960, 16)
    torch.testing.assert_close(stacked[:, :960], frames)
    torch.testing.assert_close(from_lms, stacked)


def test_head_default_random_weights_and_a_later_checkpoint(tmp_path):
    cfg = evar_cfg(weight_file=str(tmp_path / 'm2d_vit_tiny-80x208p16x16p16k-random' / 'random'))
    ar = head_wrapper(cfg)
    assert cfg.feature_d == 960 and cfg.sr == '16k' and ar.cfg.mean == -7.1
    # A later checkpoint's stored stats win over the yaml's -7.1/4.2 (as EVAR HEAD's own runtime does).
    path = make_checkpoint(tmp_path, name='plain.pth')
    ckpt = torch.load(path)
    ckpt['model']['norm_stats'] = torch.tensor([-6.5, 3.5])
    later = path.parent.parent / 'm2d_vit_tiny-80x208p16x16p16k-240101' / 'checkpoint-1.pth'
    later.parent.mkdir()
    torch.save(ckpt, later)
    ar = head_wrapper(evar_cfg(weight_file=str(later)))
    ar.precompute('cpu', None)
    assert ar.norm_stats == [-6.5, 3.5]
    assert head_wrapper(evar_cfg(weight_file=str(later), mean=None)).cfg.mean == -6.5  # no yaml stats: the stored


def test_head_clap_wrapper(tmp_path):
    path = make_checkpoint(tmp_path, name='plain.pth')
    ckpt = torch.load(path)
    torch.manual_seed(0)
    ckpt['model'].update({'norm_stats': torch.tensor([-7.2, 4.3]), 'audio_proj.0.weight': torch.randn(192, 192) * 0.05,
                          'audio_proj.0.bias': torch.zeros(192), 'audio_proj.2.weight': torch.randn(192, 192) * 0.05,
                          'audio_proj.2.bias': torch.zeros(192)})
    clap = tmp_path / 'm2d_clap_vit_tiny-80x208p16x16p16k-240101' / 'checkpoint-1.pth'
    clap.parent.mkdir()
    torch.save(ckpt, clap)
    # config/m2d_clap.yaml: AR_M2D_CLAP, flat token features, no mean/std.
    ar = head_wrapper(evar_cfg(audio_repr='ar_m2d.AR_M2D_CLAP', weight_file=str(clap), flat_features=True, mean=None))
    ar.precompute('cpu', None)
    assert ar.norm_stats == pytest.approx([-7.2, 4.3]) and ar.cfg.feature_d == 192
    audio = torch.zeros(3, 24000).uniform_(-1, 1)
    with torch.no_grad():
        emb = ar.encode_audio(audio)
        expected = ar.runtime.encode_clap_audio(audio)
    assert emb.shape == (3, 192)
    torch.testing.assert_close(emb, expected)
    similarity = ar.compute_similarity(emb[:2], emb)
    assert similarity.shape == (2, 3) and torch.allclose(similarity.diagonal(), torch.ones(2))
    with pytest.raises(ValueError, match='text_encoder='):
        ar.encode_text(['a dog barks'])
