"""Stand-in for evar.ar_base: the audio-representation base class and the normalisation helpers.

EVAR calls `ar.precompute(device, train_loader)` once, then `ar(batch_audio)` -> [B, D] embeddings;
fine-tuning sets a feature augmentation with `set_augment_tf_feature_fn`, applied only in training.
CLAP representations (EVAR HEAD's BaseCLAP) also map texts into the audio embedding space.
"""
import torch
import torch.nn as nn


class EasyDict(dict):
    """A dict whose keys are also attributes (EVAR passes configs as EasyDict)."""

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError as e:
            raise AttributeError(key) from e

    def __setattr__(self, key, value):
        self[key] = value


class BaseAudioRepr(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = EasyDict(cfg.copy())
        self.aug_fn = None

    def precompute(self, device, data_loader):
        """Compute whatever the representation needs from training data (e.g. normalisation stats)."""

    def encode_frames(self, batch_audio):
        raise NotImplementedError

    def forward(self, batch_audio):
        raise NotImplementedError

    def set_augment_tf_feature_fn(self, aug_fn):
        self.aug_fn = aug_fn

    def augment_if_training(self, tf_feature):
        if self.aug_fn is None or not self.training:
            return tf_feature
        return self.aug_fn(tf_feature)


class BaseCLAP(BaseAudioRepr):
    """An audio representation with a text side: encode_audio / encode_text into one embedding space."""

    def encode_audio(self, batch_audio):
        raise NotImplementedError

    def encode_text(self, batch_text):
        raise NotImplementedError

    def compute_similarity(self, text_embs, audio_embs):
        """Cosine similarities [texts, audios]."""
        text_embs = text_embs / text_embs.norm(dim=-1, keepdim=True)
        audio_embs = audio_embs / audio_embs.norm(dim=-1, keepdim=True)
        return text_embs @ audio_embs.T


def calculate_norm_stats(device, data_loader, converter, max_samples=5000):
    """[mean, std] of converter(batch_audio) over the loader's batches (up to max_samples clips)."""
    values, seen = [], 0
    for batch_audio, _ in data_loader:
        with torch.no_grad():
            values.append(converter(batch_audio.to(device)).detach().cpu().flatten())
        seen += len(batch_audio)
        if seen >= max_samples:
            break
    values = torch.cat(values)
    return torch.stack([values.mean(), values.std()])


def normalize_spectrogram(norm_stats, spectrograms):
    mu, sigma = norm_stats
    return (spectrograms - mu) / sigma
