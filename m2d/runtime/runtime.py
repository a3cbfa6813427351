"""RuntimeM2D: load a pre-trained M2D-family checkpoint (or MSM-MAE/MAE) and turn audio into features.

    runtime = RuntimeM2D(weight_file='m2d_vit_base-80x608p16x16-220930-mr7/checkpoint-300.pth')
    frames = runtime.encode(batch_audio)          # [B, S] 16 kHz -> [B, ceil(T/16), 3840]

A facade over the runtime package: settings (m2d.runtime.config), building from a weight file
(m2d.runtime.build), chunked encoding (m2d.runtime.encode), timestamps (m2d.runtime.timestamps) and
visualisation helpers (m2d.runtime.visual).

The model and its sizes come from explicit settings (RuntimeM2D(weight_file=..., model='m2d_vit_base',
input_size=[80, 608], patch_size=[16, 16])), else from the checkpoint (the training args it stores, and
its weights), else from its folder name (`<model>-<F>x<T>p<pf>x<pt>[p<sr>]-...`, see m2d.checkpoint).
A file name ending in `random` gives random weights. Files are read with the weights-only loader;
trust_checkpoint=True is the opt-in for files that need full unpickling.

LMS normalisation: first-release checkpoints (no stored `norm_stats`) normalise each batch with its own
mean and std, as the published runtime; later formats (stored `norm_stats`, as this project's trainer
also writes them; a sample-rate part in the folder name; M2D-AS/X/S/CLAP) and explicit stats
(norm_stats=[mean, std], or EVAR's `mean`/`std`) use fixed stats, and encode the last partial chunk alone
with its own positions, as the later runtime.

In eval mode (the default) encoding runs under torch.inference_mode and returns ordinary tensors;
call .train() for gradients (and for the training mask, when one is set).
"""
import logging
from typing import Any, Optional, Union

import numpy as np
import torch
import torch.nn as nn

from m2d.audio.lms import LogMelSpectrogram
from m2d.checkpoint import DEFAULT_NORM_STATS, EXTRA_PARTS, FRONT_ENDS
from m2d.model.clap import TextEncoder, projection_from_state
from m2d.runtime import visual
from m2d.runtime.build import TaskHead, build_backbone
from m2d.runtime.config import CONFIG_SETTINGS, Config, write_back
from m2d.runtime.encode import encode_chunks, split_last_chunk
from m2d.runtime.inference import encode_inference
from m2d.runtime.timestamps import timestamp_embeddings

log = logging.getLogger(__name__)

AudioLike = Union[torch.Tensor, np.ndarray]


def _as_tensor(x: AudioLike, what: str) -> torch.Tensor:
    """A numpy array as a tensor (sharing memory); TypeError naming `what` for anything but the two."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not torch.is_tensor(x):
        raise TypeError(f'{what} must be a torch.Tensor or numpy array, got {type(x).__name__}')
    return x


class RuntimeM2D(nn.Module):
    """Audio -> log-mel spectrogram -> M2D features.

    Args:
        cfg: a Config, dict or attribute object such as EVAR's EasyDict (missing settings take Config's
            defaults; other keys stay readable on runtime.cfg). The settled settings (RESOLVED_SETTINGS:
            model, sizes, front end, mean/std, feature_d, ...) are also set on it, as the published runtime
            does (EVAR reads them from its config).
        weight_file: checkpoint path (overrides cfg.weight_file); a name ending in 'random' gives random weights.
        training_mask: > 0 masks that ratio of tokens (whole rows/columns) in training mode; features are flat.
        **settings: any Config setting, e.g. model='m2d_vit_base', input_size=[80, 608], cls_token=True,
            norm_stats=[-7.1, 4.2], num_classes=527, dur_frames=1001, text_encoder='/path/to/gte-base'.
    """

    def __init__(self, cfg: Any = None, weight_file: Optional[str] = None, training_mask: float = 0.0,
                 **settings):
        super().__init__()
        given = cfg
        cfg = Config.from_any(cfg)
        for key, value in settings.items():
            if key not in CONFIG_SETTINGS:
                raise TypeError(f'RuntimeM2D got an unknown setting {key!r}')
            setattr(cfg, key, value)
        cfg.weight_file = str(weight_file or cfg.weight_file)
        if not cfg.weight_file:
            raise ValueError('RuntimeM2D needs a weight_file (a checkpoint path, or a name ending in "random")')
        cfg.training_mask = training_mask if training_mask > 0.0 else cfg.training_mask
        cfg.flat_features = bool(cfg.flat_features or cfg.training_mask > 0.0)
        self.cfg = cfg
        self.backbone, self.spec, parts = build_backbone(cfg)
        if cfg.sr != '16k':
            for key, value in FRONT_ENDS[cfg.sr].items():
                setattr(cfg, key, value)
        stats = (self.spec.norm_stats or (None if cfg.mean is None or cfg.std is None else (cfg.mean, cfg.std))
                 or (DEFAULT_NORM_STATS if self.spec.later_format else None))
        cfg.mean, cfg.std = (float(stats[0]), float(stats[1])) if stats else (None, None)
        cfg.last_chunk = cfg.last_chunk or ('trim' if stats or cfg.dur_frames else 'pad')
        if cfg.last_chunk not in ('pad', 'trim'):
            raise ValueError(f"last_chunk must be 'pad' or 'trim', got {cfg.last_chunk!r}")
        if cfg.training_mask > 0.0:
            self.backbone.set_random_structured_mask()
        if cfg.freeze_embed:
            self.backbone.patch_embed.requires_grad_(False)
        self.grid_f = cfg.input_size[0] // cfg.patch_size[0]
        self.embed_dim = self.backbone.pos_embed.shape[-1]
        evar_head = parts.extra.get('head')
        if cfg.num_classes and evar_head and evar_head['mlp.mlp.0.weight'].shape[-1] == self.embed_dim:
            cfg.flat_features = True  # a head fine-tuned on token features (as the later runtime decides)
        cfg.feature_d = self.embed_dim * ((1 if cfg.flat_features else self.grid_f) + int(cfg.cls_token))
        if cfg.num_classes:
            self.head = TaskHead(cfg.feature_d, int(cfg.num_classes))
            if evar_head:
                self.head.load_evar(evar_head)
        if 'audio_proj' in parts.extra or 'text_proj' in parts.extra:
            self.audio_proj = projection_from_state(parts.extra.get('audio_proj'), 'audio_proj')
            self.text_proj = projection_from_state(parts.extra.get('text_proj'), 'text_proj')
        self._text_weights = parts.extra.get('text_encoder')
        used = ('audio_proj', 'text_proj', 'text_encoder') + (('head',) if cfg.num_classes else ())
        unused = [name for name in parts.extra if name not in used]
        if unused:
            log.warning('%s also holds %s; not used here', cfg.weight_file,
                        ', '.join(f'{name} ({EXTRA_PARTS[name]})' for name in unused))
        self.to_spec = LogMelSpectrogram(cfg.sample_rate, cfg.n_fft, cfg.window_size, cfg.hop_size,
                                         cfg.n_mels, cfg.f_min, cfg.f_max)
        self.sample_rate = cfg.sample_rate
        self._forward_encoder = (torch.compile(self.backbone.forward_encoder, dynamic=True) if cfg.compile
                                 else self.backbone.forward_encoder)
        self._encode_inference = torch.compile(encode_inference, dynamic=True) if cfg.compile else encode_inference
        if given is not None:
            write_back(given, cfg)
        log.info('RuntimeM2D %s', cfg)
        self.eval()

    @property
    def device(self) -> torch.device:
        return self.backbone.cls_token.device

    @property
    def norm_stats(self) -> Optional[tuple[float, float]]:
        """The fixed LMS (mean, std) this runtime normalises with; None for per-batch statistics."""
        return None if self.cfg.mean is None else (self.cfg.mean, self.cfg.std)

    @property
    def scene_embedding_size(self) -> int:
        return self.cfg.feature_d

    timestamp_embedding_size = scene_embedding_size

    # ----- input checks ---------------------------------------------------------------------------

    def _min_samples(self) -> int:
        return self.cfg.hop_size * (self.cfg.patch_size[1] - 1)

    def check_audio(self, audio: AudioLike) -> torch.Tensor:
        """Validate mono audio [B, S] (or [S]) and move it to the model's device as float32."""
        audio = _as_tensor(audio, 'audio')
        if not audio.is_floating_point():
            raise TypeError(f'audio must be float samples in [-1, 1], got {audio.dtype}; '
                            'scale integer PCM first (e.g. int16 / 32768)')
        if audio.ndim == 1:
            audio = audio[None]
        if audio.ndim != 2:
            raise ValueError(f'audio must be mono [batch, samples] or [samples], got shape {list(audio.shape)}; '
                             'mix channels to mono first, e.g. audio.mean(dim=1)')
        if audio.numel() == 0:
            raise ValueError(f'audio is empty (shape {list(audio.shape)})')
        if audio.shape[1] < self._min_samples():
            sr, (rows, samples) = self.cfg.sample_rate, audio.shape
            transposed = (f'. If [{rows}, {samples}] is [samples, channels], mix to mono first: audio.mean(1)'
                          if rows > samples else '')
            raise ValueError(f'audio of {samples} samples ({1000 * samples / sr:.0f} ms) is shorter than one patch '
                             f'({self.cfg.patch_size[1]} frames = {self._min_samples()} samples at {sr} Hz); pad it'
                             + transposed)
        bad = ~torch.isfinite(audio).all(dim=1)
        if bad.any():
            raise ValueError(f'audio holds NaN or inf values (clips {bad.nonzero().flatten().tolist()[:10]})')
        return audio.to(self.device, torch.float32)

    def check_lms(self, lms: AudioLike) -> torch.Tensor:
        """Validate an LMS batch [B, 1, F, T] and move it to the model's device."""
        lms = _as_tensor(lms, 'LMS')
        if not lms.is_floating_point():
            raise TypeError(f'LMS must be floating point, got {lms.dtype}')
        n_mels, patch_t = self.cfg.input_size[0], self.cfg.patch_size[1]
        if lms.ndim != 4 or lms.shape[1] != 1 or lms.shape[2] != n_mels:
            hint = ' (add the channel dim: lms.unsqueeze(1))' if lms.ndim == 3 else ''
            raise ValueError(f'encode_lms takes LMS [B, 1, {n_mels}, T], got {list(lms.shape)}{hint}')
        if lms.shape[0] == 0 or lms.shape[-1] < patch_t:
            raise ValueError(f'LMS of {lms.shape[-1]} frames in a batch of {lms.shape[0]}: need at least one '
                             f'clip of {patch_t} frames (one patch)')
        if not torch.isfinite(lms).all():
            raise ValueError('LMS holds NaN or inf values')
        return lms.to(self.device, torch.float32)

    # ----- front end ------------------------------------------------------------------------------

    def to_feature(self, batch_audio: AudioLike) -> torch.Tensor:
        """Audio [B, S] -> LMS [B, 1, n_mels, 1 + S // hop], always in float32.

        A caller's autocast is paused here: bfloat16 samples and STFT would bury quiet frequency
        bins under rounding noise, and the log would magnify it.
        """
        audio = self.check_audio(batch_audio)
        with torch.autocast(audio.device.type, enabled=False):
            return self.to_spec(audio).unsqueeze(1)

    def normalize_batch(self, x: torch.Tensor, return_stats: bool = False):
        """(x - mean) / std with the runtime's fixed stats (cfg.mean, cfg.std), else with the whole batch's
        own mean and std (first-release checkpoints); with return_stats also (mean, std)."""
        if self.norm_stats is not None:
            mu, sigma = self.norm_stats
        else:
            mu, sigma = x.mean(), x.std()
            if not sigma > 1e-5:  # digital silence: every LMS value is log(eps) (std is only rounding noise)
                raise ValueError('cannot normalise a batch of constant spectrograms (digital silence?); normalise '
                                 'with dataset statistics instead: (runtime.to_feature(audio) - mean) / std')
        x = (x - mu) / sigma
        return (x, (mu, sigma)) if return_stats else x

    def to_normalized_spec(self, batch_audio: AudioLike, return_stats: bool = False):
        """Audio [B, S] -> normalised LMS [B, 1, n_mels, T] (see normalize_batch)."""
        return self.normalize_batch(self.to_feature(batch_audio), return_stats=return_stats)

    # ----- encoder (m2d.runtime.encode) -----------------------------------------------------------

    def encode_lms(self, lms: AudioLike, return_layers: bool = False):
        """LMS [B, 1, F, T] -> frame features [B, ceil(T / pt), D * F/pf].

        Time is split into chunks of the model's input width, all chunks are encoded in batched passes
        without masking, and the frames that come from padding are dropped. The last partial chunk is
        right-padded with zeros to the model width (last_chunk 'pad', the first release), or to whole
        patches and encoded with its own positions ('trim', the later runtime). return_layers=True gives
        a list with one such tensor per block (the last one after the final norm). With flat_features:
        token features [B, tokens, D].
        """
        lms = self.check_lms(lms)
        with torch.inference_mode(not self.training):
            parts = [encode_chunks(self, x, return_layers, width) for x, width in split_last_chunk(self, lms)]
            layers = [torch.cat(per_part, dim=1) for per_part in zip(*parts)]
        if not self.training:  # inference tensors -> ordinary ones, usable anywhere afterwards
            layers = [x.clone() for x in layers]
        return layers if return_layers else layers[0]

    def encode(self, batch_audio: AudioLike) -> torch.Tensor:
        """Audio [B, S] -> frame features [B, ceil((1 + S // hop) / pt), D * F/pf]."""
        return self.encode_lms(self.to_normalized_spec(batch_audio))

    def forward(self, batch_audio: AudioLike) -> torch.Tensor:
        """Audio [B, S] -> logits [B, num_classes] with a task head (num_classes), else encode(audio)."""
        x = self.encode(batch_audio)
        return self.head(x.mean(dim=1)) if hasattr(self, 'head') else x

    # ----- M2D-CLAP -------------------------------------------------------------------------------

    def _require_clap(self) -> None:
        if not hasattr(self, 'audio_proj'):
            raise ValueError(f'{self.cfg.weight_file} is not an M2D-CLAP checkpoint (no audio_proj/text_proj weights)')

    def project_audio(self, features: torch.Tensor) -> torch.Tensor:
        """Audio features [B, T, D] (flat tokens) or [B, T, D * F/pf] (frames) -> CLAP audio embeddings [B, D'].

        The semantic-token projector reads all tokens; the MLP projector their mean (token order is
        irrelevant to both, so frame and flat features give the same result).
        """
        self._require_clap()
        B, T, D = features.shape
        if D == self.grid_f * self.embed_dim and D != self.embed_dim:
            features = features.reshape(B, T * self.grid_f, self.embed_dim)
        elif D != self.embed_dim:
            raise ValueError(f'project_audio takes features [B, T, {self.embed_dim}] or [B, T, '
                             f'{self.grid_f * self.embed_dim}] (last layer, no cls_token), got {list(features.shape)}')
        if isinstance(self.audio_proj, (nn.Sequential, nn.Identity)):
            features = features.mean(dim=1)
        return self.audio_proj(features)

    def encode_clap_audio(self, batch_audio: AudioLike) -> torch.Tensor:
        """Audio [B, S] -> CLAP audio embeddings [B, D'] in the space shared with encode_clap_text."""
        self._require_clap()
        return self.project_audio(self.encode(batch_audio))

    def encode_clap_text(self, texts: list[str]) -> torch.Tensor:
        """Texts -> CLAP text embeddings [B, D'] (float32, on the CPU as the later runtime), with the text
        encoder from the local folder cfg.text_encoder (loaded on first use)."""
        self._require_clap()
        if not hasattr(self, 'text_model'):
            kind = self.spec.name_extra[0] if self.spec.name_extra else 'A'  # e.g. ...p16kpBpTI -> 'B'
            self.text_model = TextEncoder(self.cfg.text_encoder, kind, self._text_weights).to(self.device)
        with torch.inference_mode(not self.training):
            embeddings = self.text_proj(self.text_model(texts))
        return embeddings.detach().float().cpu().clone()

    # ----- HEAR-style embeddings (m2d.runtime.timestamps) -----------------------------------------

    def get_scene_embeddings(self, audio: AudioLike) -> torch.Tensor:
        """Audio [B, S] -> clip embeddings [B, feature_d] (time mean of encode())."""
        return self.encode(audio).mean(dim=1)

    def get_timestamp_embeddings(self, audio: AudioLike, hop_ms: Optional[float] = None
                                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Audio [B, S] -> (frame embeddings [B, T', feature_d], timestamps [B, T'] in ms), evenly spaced by
        hop_ms (default cfg.timestamp_hop_ms, else one per patch: 160 ms); see m2d.runtime.timestamps."""
        return timestamp_embeddings(self, audio, hop_ms)

    # ----- visualisation (m2d.runtime.visual) -----------------------------------------------------

    def reconstruct(self, lms: torch.Tensor, mask_ratio: float, start_frame: int = 0):
        """Mask and reconstruct one model-width crop of lms [B, 1, F, T] from start_frame; -> (loss, lms_cropped
        [B, 1, F, W], recons, errormap, mask [B, F', T']) (recons, errormap: None for M2D)."""
        return visual.reconstruct(self, lms, mask_ratio, start_frame)

    def decode_to_lms(self, latent: torch.Tensor) -> torch.Tensor:
        """Encoder outputs for all tokens [B, 1+N, D] -> an LMS [B, 1, F, W] (MAE-family models only)."""
        return visual.decode_to_lms(self, latent)

    def lms_to_wav(self, single_lms: torch.Tensor, norm_stats: tuple[float, float], sr: int = 16000,
                   n_fft: int = 400, hop_length: int = 160, win_length: int = 400) -> np.ndarray:
        """One normalised LMS [F, T] -> a waveform (Griffin-Lim), with the stats that normalised it."""
        return visual.lms_to_wav(self, single_lms, norm_stats, sr, n_fft, hop_length, win_length)
