"""M2D as an EVAR audio representation (nttcslab/eval-audio-repr), configured by m2d.yaml.

Setup with an EVAR checkout cloned into this repository's folder as `evar/` (docs/evaluation.md); works with
the EVAR of the published numbers (a520758) and with EVAR HEAD, whose files of the same names the links replace:
    ln -sf ../../for_evar/ar_m2d.py evar/evar
    ln -sf ../../for_evar/m2d.yaml evar/config
    (a520758 only: add `import evar.ar_m2d` to evar/lineareval.py and evar/finetune.py)
m2d is imported from the environment when installed (`pip install -e /path/to/this/repo`), else from the
repository this file really lives in (the symlink is followed), so EVAR needs no copy of the code.
"""
import sys
from pathlib import Path

import torch

try:
    import m2d.runtime.runtime  # noqa: F401  (an installed m2d)
except ImportError:
    sys.path.append(str(Path(__file__).resolve().parents[1]))

from evar.ar_base import BaseAudioRepr, calculate_norm_stats, normalize_spectrogram

from m2d.eval.embeddings import check_layers, layer_features
from m2d.runtime.runtime import RuntimeM2D


class AR_M2D(BaseAudioRepr):
    """EVAR wrapper of RuntimeM2D: audio [B, S] -> frame features [B, D, T] -> clip embedding [B, D].

    cfg (from m2d.yaml, overridable on EVAR's command line): weight_file, output_layers (blocks whose
    features are concatenated; [-1] = the final output), training_mask (token masking while fine-tuning),
    cls_token, trust_checkpoint and the mel settings; other RuntimeM2D settings (e.g. norm_stats) with
    EVAR's `+key=value`. cfg.feature_d is set to the resulting embedding size.
    """

    def __init__(self, cfg):
        super().__init__(cfg=cfg)
        self.runtime = RuntimeM2D(cfg=self.cfg, weight_file=self.cfg.weight_file,
                                  training_mask=float(self.cfg.get('training_mask') or 0.0))
        self.output_layers = check_layers(self.runtime, self.cfg.get('output_layers') or [-1])
        feature_d = self.runtime.cfg.feature_d * len(self.output_layers)
        self.cfg['feature_d'] = cfg['feature_d'] = feature_d  # EVAR sizes its heads from cfg.feature_d
        self.norm_stats = None

    def precompute(self, device, data_loader):
        """Normalisation stats [mean, std]: the runtime's fixed ones (stored with later-format weights, or
        given as norm_stats), else those of the training LMS."""
        fixed = self.runtime.norm_stats
        self.norm_stats = (torch.tensor(fixed) if fixed is not None
                           else calculate_norm_stats(device, data_loader, self.runtime.to_feature))

    def normalize(self, lms):
        if self.norm_stats is None:
            raise RuntimeError('AR_M2D: call precompute(device, train_loader) before encoding (it computes the '
                               'normalisation stats); AR_M2D_BatchNormStats normalises per batch instead')
        return normalize_spectrogram(self.norm_stats, lms)

    def encode_frames(self, batch_audio):
        """Audio [B, S] -> [B, D, T] (the features of cfg.output_layers, concatenated; augmented only in training)."""
        x = self.normalize(self.runtime.to_feature(batch_audio))
        x = self.augment_if_training(x)
        return layer_features(self.runtime, x, self.output_layers).transpose(1, 2)

    def forward(self, batch_audio):
        """Audio [B, S] -> clip embeddings [B, D] (time mean of encode_frames)."""
        return self.encode_frames(batch_audio).mean(dim=-1)


class AR_M2D_BatchNormStats(AR_M2D):
    """AR_M2D normalising as RuntimeM2D.encode does instead of with dataset stats: each batch with its own mean
    and std (first-release weights), or with the stats later weights store."""

    def precompute(self, device, data_loader):
        pass

    def normalize(self, lms):
        return self.runtime.normalize_batch(lms)
