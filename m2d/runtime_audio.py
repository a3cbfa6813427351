"""RuntimeM2D: load a pre-trained M2D (or MSM-MAE/MAE) checkpoint and turn audio into features.

    runtime = RuntimeM2D(weight_file='m2d_vit_base-80x608p16x16-220930-mr7/checkpoint-300.pth')
    frames = runtime.encode(batch_audio)          # [B, S] 16 kHz -> [B, ceil(T/16), 3840]

The folder name of the weight file tells the model and its sizes (`<model>-<F>x<T>p<pf>x<pt>-...`);
they can also be given explicitly: RuntimeM2D(weight_file=..., model='m2d_vit_base',
input_size=[80, 608], patch_size=[16, 16]). A file name ending in `random` gives random weights.

In eval mode (the default) encoding runs under torch.inference_mode and returns ordinary tensors;
call .train() for gradients (and for the training mask, when one is set).
"""
import contextlib
import logging
import re
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from util.checkpoint import load_checkpoint

from .encoder_inference import encode_inference
from .lms import LogMelSpectrogram
from .models_mae import M2DViT, MaskedAutoencoderViT, create_model

log = logging.getLogger(__name__)

FOLDER_NAME_FORMAT = '<model>-<F>x<T>p<pf>x<pt>[-<date>-<conf>], e.g. m2d_vit_base-80x608p16x16-220930-mr7'
_FOLDER_NAME = re.compile(r'^(?P<model>\w+?)-(?P<F>\d+)x(?P<T>\d+)p(?P<pf>\d+)x(?P<pt>\d+)(?:-.*)?$')
# Checkpoint entries that only the pre-training objective uses (dropped for encoder-only loading).
_NON_ENCODER_PREFIXES = ('decoder', 'target', 'mask_token')

AudioLike = Union[torch.Tensor, np.ndarray]


class Config:
    """Runtime settings. Any attribute can be set by keyword: Config(cls_token=True)."""
    weight_file = ''
    model = ''             # '' = read from the weight file's folder name
    input_size = None      # [F, T]; None = from the folder name
    patch_size = None      # [pf, pt]; None = from the folder name
    feature_d = 768 * 5    # set by RuntimeM2D: D * F/pf, plus D with cls_token
    cls_token = False      # prepend the [CLS] output to every frame feature
    training_mask = 0.0    # > 0: structured token masking in training mode, flat token features
    flat_features = False  # [B, tokens, D] instead of [B, frames, D * F/pf]
    encoder_only = False   # ignore decoder/target weights (less memory; no reconstruct())
    max_chunks_per_pass = 256  # input chunks encoded in one forward pass (bounds memory; all in one with a training mask)
    timestamp_hop_ms = 0.0  # get_timestamp_embeddings hop; 0 = the patch width (16 frames: 160 ms)
    autocast_bf16 = False  # fast path: encode under bfloat16 autocast
    compile = False        # fast path: torch.compile the encoder
    # Log-mel front end.
    sample_rate = 16000
    n_fft = 400
    window_size = 400
    hop_size = 160
    n_mels = 80
    f_min = 50
    f_max = 8000

    def __init__(self, **kwargs):
        for key, value in kwargs.items():
            if key not in CONFIG_SETTINGS:
                raise TypeError(f'Config has no setting {key!r}')
            setattr(self, key, value)

    @classmethod
    def from_any(cls, cfg: Any = None) -> 'Config':
        """A fresh Config from None, a Config, a dict, or any object with attributes (e.g. EVAR's
        EasyDict); settings it does not know are ignored, and the given object is never modified."""
        if cfg is None:
            return cls()
        get = cfg.get if isinstance(cfg, dict) else (lambda key, default: getattr(cfg, key, default))
        return cls(**{k: get(k, getattr(Config, k)) for k in CONFIG_SETTINGS})

    def __repr__(self) -> str:
        return 'Config(' + ', '.join(f'{k}={getattr(self, k)!r}' for k in CONFIG_SETTINGS) + ')'


CONFIG_SETTINGS = tuple(k for k, v in vars(Config).items()
                        if not k.startswith('_') and not isinstance(v, (classmethod, type(Config.__init__))))


def parse_sizes_by_name(name: str) -> tuple[list[int], list[int], str]:
    """'m2d_vit_base-80x608p16x16-220930-mr7' -> ([80, 608], [16, 16], 'm2d_vit_base')."""
    m = _FOLDER_NAME.match(name)
    if not m:
        raise ValueError(f'cannot read the model and its sizes from the folder name {name!r}; expected '
                         f'{FOLDER_NAME_FORMAT}. Rename the folder, or give them explicitly: '
                         "RuntimeM2D(weight_file=..., model='m2d_vit_base', input_size=[80, 608], patch_size=[16, 16])")
    return [int(m['F']), int(m['T'])], [int(m['pf']), int(m['pt'])], m['model']


def extract_state_dict(checkpoint: Any, path: Union[str, Path]) -> dict[str, torch.Tensor]:
    """The model state dict of a `{'model': state_dict, ...}` or bare-state-dict checkpoint."""
    state = checkpoint.get('model', checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not state or not all(torch.is_tensor(v) for v in state.values()):
        keys = list(checkpoint)[:8] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(f'{path} holds no model state dict (expected {{"model": state_dict, ...}} or a bare '
                         f'state dict; found {keys})')
    if all(k.startswith('module.') for k in state):  # saved from a DDP-wrapped model
        state = {k[len('module.'):]: v for k, v in state.items()}
    return state


def parse_size(size: Union[int, str, list, tuple]) -> list[int]:
    """16 / '16' / '80x608' / [80, 608] -> [int, int] (a single number is square); both positive."""
    parts = [size] if isinstance(size, int) else size.lower().split('x') if isinstance(size, str) else list(size)
    try:
        pair = [int(v) for v in parts]
    except (TypeError, ValueError):
        pair = []
    pair = pair * 2 if len(pair) == 1 else pair
    if len(pair) != 2 or min(pair) <= 0:
        raise ValueError(f'a size must be [height, width] or "HxW" (e.g. [80, 608] or "80x608"), got {size!r}')
    return pair


def _count_blocks(state: dict, prefix: str) -> int:
    indices = {int(k.split('.')[1]) for k in state if k.startswith(prefix + '.')}
    return max(indices) + 1 if indices else 0


def load_state_strict(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """load_state_dict(strict=True), failing with every missing, unexpected and mis-shaped key."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [f'{k}: checkpoint {list(state[k].shape)} vs model {list(own[k].shape)}'
                  for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        def listing(title, keys):
            return f'\n  {title} ({len(keys)}): ' + ', '.join(keys[:12]) + (' ...' if len(keys) > 12 else '')
        raise ValueError(f'the checkpoint does not match {what}:'
                         + (listing('missing keys', missing) if missing else '')
                         + (listing('unexpected keys', unexpected) if unexpected else '')
                         + (listing('shape mismatches', mismatched) if mismatched else '')
                         + '\n  Check the model name and sizes (folder name or explicit arguments).')
    model.load_state_dict(state)


def build_backbone(cfg: Config) -> MaskedAutoencoderViT:
    """Create the model named by cfg (filled from the folder name where unset) and load its weights.

    Encoder and decoder depths follow the checkpoint; a checkpoint without decoder weights (or
    cfg.encoder_only) gives an encoder-only model.
    """
    path = Path(cfg.weight_file)
    random_weights = path.name.endswith('random')
    # Read the checkpoint first, so that a wrong path reports "not found" rather than a naming problem.
    state = None if random_weights else extract_state_dict(load_checkpoint(path), path)
    if not (cfg.model and cfg.input_size and cfg.patch_size):
        # The folder name, or for random weights also the name itself ('m2d_vit_base-80x608p16x16-random').
        name = path.name if random_weights and _FOLDER_NAME.match(path.name) else path.parent.name
        input_size, patch_size, model = parse_sizes_by_name(name)
        cfg.model, cfg.input_size, cfg.patch_size = (cfg.model or model, cfg.input_size or input_size,
                                                     cfg.patch_size or patch_size)
    cfg.input_size, cfg.patch_size = parse_size(cfg.input_size), parse_size(cfg.patch_size)
    kwargs = dict(img_size=cfg.input_size, patch_size=cfg.patch_size)
    if random_weights:
        log.warning('Random weights: %s', path)
    else:
        if cfg.encoder_only:
            state = {k: v for k, v in state.items() if not k.startswith(_NON_ENCODER_PREFIXES)}
        kwargs['depth'] = _count_blocks(state, 'blocks')
        decoder_depth = _count_blocks(state, 'decoder_blocks')
        if decoder_depth:
            kwargs['decoder_depth'] = decoder_depth
        else:
            cfg.encoder_only = True
    model = create_model(cfg.model, encoder_only=cfg.encoder_only, **kwargs)
    if state is not None:
        load_state_strict(model, state, f'{cfg.model}(input {cfg.input_size}, patch {cfg.patch_size}, '
                                        f'{len(model.blocks)} blocks{", encoder only" if cfg.encoder_only else ""})')
    return model.eval()


class RuntimeM2D(nn.Module):
    """Audio -> log-mel spectrogram -> M2D features.

    Args:
        cfg: a Config, dict or attribute object (missing settings take Config's defaults).
        weight_file: checkpoint path (overrides cfg.weight_file); a name ending in 'random' gives random weights.
        training_mask: > 0 masks that ratio of tokens (whole rows/columns) in training mode; features are flat.
        **settings: any Config setting, e.g. model='m2d_vit_base', input_size=[80, 608], cls_token=True.
    """

    def __init__(self, cfg: Any = None, weight_file: Optional[str] = None, training_mask: float = 0.0,
                 **settings):
        super().__init__()
        cfg = Config.from_any(cfg)
        for key, value in settings.items():
            if key not in CONFIG_SETTINGS:
                raise TypeError(f'RuntimeM2D got an unknown setting {key!r}')
            setattr(cfg, key, value)
        cfg.weight_file = str(weight_file or cfg.weight_file)
        if not cfg.weight_file:
            raise ValueError('RuntimeM2D needs a weight_file (a checkpoint path, or a name ending in "random")')
        cfg.training_mask = training_mask if training_mask > 0.0 else cfg.training_mask
        cfg.flat_features = cfg.flat_features or cfg.training_mask > 0.0
        self.cfg = cfg
        self.backbone = build_backbone(cfg)
        if cfg.training_mask > 0.0:
            self.backbone.set_random_structured_mask()
        self.grid_f = cfg.input_size[0] // cfg.patch_size[0]
        self.embed_dim = self.backbone.pos_embed.shape[-1]
        cfg.feature_d = self.embed_dim * ((1 if cfg.flat_features else self.grid_f) + int(cfg.cls_token))
        self.to_spec = LogMelSpectrogram(cfg.sample_rate, cfg.n_fft, cfg.window_size, cfg.hop_size,
                                         cfg.n_mels, cfg.f_min, cfg.f_max)
        self.sample_rate = cfg.sample_rate
        self._forward_encoder = (torch.compile(self.backbone.forward_encoder, dynamic=True) if cfg.compile
                                 else self.backbone.forward_encoder)
        self._encode_inference = torch.compile(encode_inference, dynamic=True) if cfg.compile else encode_inference
        log.info('RuntimeM2D %s', cfg)
        self.eval()

    @property
    def device(self) -> torch.device:
        return self.backbone.cls_token.device

    @property
    def scene_embedding_size(self) -> int:
        return self.cfg.feature_d

    timestamp_embedding_size = scene_embedding_size

    # ----- input checks ---------------------------------------------------------------------------

    def _min_samples(self) -> int:
        return self.cfg.hop_size * (self.cfg.patch_size[1] - 1)

    def check_audio(self, audio: AudioLike) -> torch.Tensor:
        """Validate mono audio [B, S] (or [S]) and move it to the model's device as float32."""
        if isinstance(audio, np.ndarray):
            audio = torch.from_numpy(audio)
        if not torch.is_tensor(audio):
            raise TypeError(f'audio must be a torch.Tensor or numpy array, got {type(audio).__name__}')
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
            sr = self.cfg.sample_rate
            raise ValueError(f'audio of {audio.shape[1]} samples ({1000 * audio.shape[1] / sr:.0f} ms) is shorter '
                             f'than one patch ({self.cfg.patch_size[1]} frames = {self._min_samples()} samples at '
                             f'{sr} Hz); pad it' + (f'. If [{audio.shape[0]}, {audio.shape[1]}] is [samples, channels], '
                                                  'mix to mono first: audio.mean(1)' if audio.shape[0] > audio.shape[1] else ''))
        bad = ~torch.isfinite(audio).all(dim=1)
        if bad.any():
            raise ValueError(f'audio holds NaN or inf values (clips {bad.nonzero().flatten().tolist()[:10]})')
        return audio.to(self.device, torch.float32)

    def check_lms(self, lms: AudioLike) -> torch.Tensor:
        """Validate an LMS batch [B, 1, F, T] and move it to the model's device."""
        if isinstance(lms, np.ndarray):
            lms = torch.from_numpy(lms)
        if not torch.is_tensor(lms):
            raise TypeError(f'LMS must be a torch.Tensor or numpy array, got {type(lms).__name__}')
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
        """(x - mean) / std over the whole batch; with return_stats also (mean, std)."""
        mu, sigma = x.mean(), x.std()
        if not sigma > 1e-5:  # digital silence: every LMS value is log(eps) (std is only rounding noise)
            raise ValueError('cannot normalise a batch of constant spectrograms (digital silence?); normalise '
                             'with dataset statistics instead: (runtime.to_feature(audio) - mean) / std')
        x = (x - mu) / sigma
        return (x, (mu, sigma)) if return_stats else x

    def to_normalized_spec(self, batch_audio: AudioLike, return_stats: bool = False):
        """Audio [B, S] -> batch-normalised LMS [B, 1, n_mels, T]."""
        return self.normalize_batch(self.to_feature(batch_audio), return_stats=return_stats)

    # ----- encoder --------------------------------------------------------------------------------

    def _encode_chunks(self, lms: torch.Tensor, return_layers: bool) -> list[torch.Tensor]:
        """LMS [B, 1, F, T] -> per-layer features [B, ceil(T / pt), D'] (flat: [B, n_chunks*K, D]).

        Chunks of W frames are encoded in batched passes, the last one right-padded with zeros to W.
        Its padded frames are dropped, so a pass of tail chunks computes only their real tokens'
        outputs in the last block (eval mode; flat features keep every token).
        """
        B, _, n_mels, T = lms.shape
        W, pt = self.cfg.input_size[1], self.cfg.patch_size[1]
        n_chunks = -(-T // W)  # a chunk made only of padding is never encoded
        chunks = F.pad(lms, (0, n_chunks * W - T)).reshape(B, 1, n_mels, n_chunks, W).permute(0, 3, 1, 2, 4)
        tail_frames = -(-(T - (n_chunks - 1) * W) // pt)
        if tail_frames == W // pt or self.cfg.flat_features:
            groups = [(chunks, W // pt)]
        else:
            groups = [(chunks[:, :-1], W // pt), (chunks[:, -1:], tail_frames)]
        per_group = [[self._to_frames(latent, B, frames)
                      for latent in self._encode_group(group.reshape(-1, 1, n_mels, W), frames, return_layers)]
                     for group, frames in groups if group.shape[1]]
        return [torch.cat(layer, dim=1) for layer in zip(*per_group)]

    def _encode_group(self, chunks: torch.Tensor, frames: int, return_layers: bool) -> list[torch.Tensor]:
        """Chunks [M, 1, F, W] of which the first `frames` frames are wanted -> per-layer latents
        [M, 1+K', D] in batched passes (K' = grid_f * frames in eval mode, else all K tokens)."""
        mask_ratio = self.cfg.training_mask if self.training else 0.0
        # A structured training mask draws its row count once per pass, so every chunk must share
        # one pass for all of them to keep the same number of tokens.
        step = len(chunks) if mask_ratio > 0 else max(1, int(self.cfg.max_chunks_per_pass))
        grid_t = self.cfg.input_size[1] // self.cfg.patch_size[1]
        keep = None
        if frames < grid_t and not self.training:  # [CLS] and the tokens of the first `frames` frames in every row
            rows = torch.arange(self.grid_f * grid_t).view(self.grid_f, grid_t)
            keep = F.pad(rows[:, :frames].flatten() + 1, (1, 0)).to(self.device)
        # Enter autocast only when asked: autocast(enabled=False) would switch off a caller's own autocast.
        autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if self.cfg.autocast_bf16
                    else contextlib.nullcontext())
        per_pass = []
        with autocast:
            for i in range(0, len(chunks), step):
                if self.training:  # masking and gradients: the model's own forward
                    latent, *_ = self._forward_encoder(chunks[i:i + step], mask_ratio, return_layers)
                else:
                    latent = self._encode_inference(self.backbone, chunks[i:i + step], keep, return_layers)
                per_pass.append(latent if return_layers else [latent])
        return [torch.cat(layer, dim=0).float() for layer in zip(*per_pass)]

    def _to_frames(self, latent: torch.Tensor, batch: int, frames: int) -> torch.Tensor:
        """[B*m, 1+K', D] latents of m chunks per clip -> [B, m*frames, D'] (frame features, the first
        `frames` of each chunk; or flat token features [B, m*K', D])."""
        cls, tokens = latent[:, :1], latent[:, 1:]
        if not self.cfg.flat_features:
            tokens = rearrange(tokens, 'b (f t) d -> b t (f d)', f=self.grid_f)[:, :frames]
        if self.cfg.cls_token:
            tokens = torch.cat([cls.expand(-1, tokens.shape[1], -1), tokens], dim=-1)
        return tokens.reshape(batch, -1, tokens.shape[-1])

    def encode_lms(self, lms: AudioLike, return_layers: bool = False):
        """LMS [B, 1, F, T] -> frame features [B, ceil(T / pt), D * F/pf].

        Time is split into chunks of the model's input width (the last one right-padded with zeros),
        all chunks are encoded in batched passes without masking, and the frames that come from
        padding are dropped. return_layers=True gives a list with one such tensor per block (the
        last one after the final norm). With flat_features: token features [B, chunks*K, D].
        """
        lms = self.check_lms(lms)
        with torch.inference_mode(not self.training):
            layers = self._encode_chunks(lms, return_layers)
        if not self.training:  # inference tensors -> ordinary ones, usable anywhere afterwards
            layers = [x.clone() for x in layers]
        return layers if return_layers else layers[0]

    def encode(self, batch_audio: AudioLike) -> torch.Tensor:
        """Audio [B, S] -> frame features [B, ceil((1 + S // hop) / pt), D * F/pf]."""
        return self.encode_lms(self.to_normalized_spec(batch_audio))

    def get_scene_embeddings(self, audio: AudioLike) -> torch.Tensor:
        """Audio [B, S] -> clip embeddings [B, feature_d] (time mean of encode())."""
        return self.encode(audio).mean(dim=1)

    def _hop_frames(self, hop_ms: float) -> int:
        """A timestamp hop in ms -> LMS frames; it must divide the patch width (pt frames)."""
        frame_ms = 1000.0 * self.cfg.hop_size / self.cfg.sample_rate
        pt = self.cfg.patch_size[1]
        hop = round(hop_ms / frame_ms)
        if hop < 1 or abs(hop * frame_ms - hop_ms) > 1e-6 or pt % hop:
            choices = ', '.join(f'{h * frame_ms:g}' for h in range(1, pt + 1) if pt % h == 0)
            raise ValueError(f'timestamp hop {hop_ms} ms is not a divisor of the patch width ({pt} frames of '
                             f'{frame_ms:g} ms); choose one of {choices}')
        return hop

    def get_timestamp_embeddings(self, audio: AudioLike, hop_ms: Optional[float] = None
                                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Audio [B, S] -> (frame embeddings [B, T', feature_d], timestamps [B, T'] in ms).

        By default (hop_ms None and cfg.timestamp_hop_ms 0) there is one embedding per patch width
        (pt LMS frames: 160 ms). A finer hop_ms (a divisor of that, e.g. 40) also encodes the
        spectrogram shifted by every multiple of the hop and interleaves the results, at pt / hop
        times the cost. Each timestamp is the centre of the LMS frames its embedding covers, so
        timestamps increase and none lies past the end of the audio.
        """
        if self.cfg.flat_features:
            raise ValueError('timestamps need frame features; flat token features (training_mask > 0) have none')
        pt = self.cfg.patch_size[1]
        hop_ms = hop_ms if hop_ms is not None else self.cfg.timestamp_hop_ms
        hop = self._hop_frames(hop_ms) if hop_ms else pt
        lms = self.to_normalized_spec(audio)
        T = lms.shape[-1]
        # Shift s gives the embeddings starting at LMS frames s, s + pt, ...; a too-short tail is
        # zero-padded to one patch, as encode_lms pads.
        shifted = [self.encode_lms(F.pad(lms[..., s:], (0, max(0, pt - (T - s))))) for s in range(0, min(pt, T), hop)]
        n_first = shifted[0].shape[1]
        x = torch.stack([F.pad(e, (0, 0, 0, n_first - e.shape[1])) for e in shifted], dim=2).flatten(1, 2)
        starts = (torch.arange(n_first)[:, None] * pt + torch.arange(len(shifted))[None] * hop).flatten()
        # Flattened (frame, shift) order sorts by start frame; the missing ones (start >= T) are the tail.
        starts = starts[starts < T].double()
        x = x[:, :len(starts)]
        last = torch.clamp(starts + pt - 1, max=T - 1)
        ts = (starts + last) / 2 * self.cfg.hop_size / self.cfg.sample_rate * 1000.0
        return x, ts.float().to(x.device).expand(x.shape[0], -1).contiguous()

    # ----- visualisation helpers ------------------------------------------------------------------

    def _require_decoder(self, what: str) -> None:
        if self.backbone.encoder_only:
            raise ValueError(f'{what} needs the decoder, but this model was loaded encoder-only '
                             '(the checkpoint has no decoder weights, or encoder_only=True)')

    def reconstruct(self, lms: torch.Tensor, mask_ratio: float, start_frame: int = 0):
        """Mask and reconstruct one model-width crop of lms [B, 1, F, T] from start_frame.

        -> (loss, lms_cropped [B, 1, F, W], recons, errormap, mask [B, F', T']); recons and errormap
        are None for M2D, whose predictor outputs representations rather than spectrogram patches.
        """
        self._require_decoder('reconstruct()')
        lms = self.check_lms(lms)
        W = self.cfg.input_size[1]
        cropped = lms[..., start_frame:start_frame + W]
        if cropped.shape[-1] != W:
            raise ValueError(f'reconstruct() needs {W} frames from start_frame={start_frame}; '
                             f'the LMS has {lms.shape[-1]}')
        with torch.inference_mode():
            loss, recons, errormap, mask = self.backbone.forward_viz(cropped, mask_ratio)
        return loss, cropped, recons, errormap, mask

    def decode_to_lms(self, latent: torch.Tensor) -> torch.Tensor:
        """Decode encoder outputs for all tokens [B, 1+N, D] (forward_encoder with mask_ratio=0) to an
        LMS [B, 1, F, W]. MAE-family models only; the decoder was trained on masked patches, so
        visible-patch reconstructions are indicative only."""
        self._require_decoder('decode_to_lms()')
        if isinstance(self.backbone, M2DViT):
            raise ValueError("decode_to_lms() needs a decoder that predicts spectrogram patches (MSM-MAE/MAE); "
                             "M2D's predictor outputs representations")
        n_tokens = self.backbone.patch_embed.num_patches
        if latent.ndim != 3 or latent.shape[1] != n_tokens + 1:
            raise ValueError(f'decode_to_lms() takes encoder outputs [B, {n_tokens + 1}, D], got {list(latent.shape)}')
        ids_restore = torch.arange(n_tokens, device=latent.device).expand(latent.shape[0], -1)
        with torch.inference_mode():
            return self.backbone.unpatchify(self.backbone.decode(latent, ids_restore))

    def lms_to_wav(self, single_lms: torch.Tensor, norm_stats: tuple[float, float], sr: int = 16000,
                   n_fft: int = 400, hop_length: int = 160, win_length: int = 400) -> np.ndarray:
        """Invert one normalised LMS [F, T] (or [1, F, T]) to a waveform with Griffin-Lim (librosa).
        Use the normalisation stats (mean, std) that produced the LMS."""
        import librosa  # imported here: only this helper needs it
        mu, sigma = (float(v) for v in norm_stats)
        mel_power = (torch.as_tensor(single_lms).detach().cpu().float().squeeze(0) * sigma + mu).exp().numpy()
        return librosa.feature.inverse.mel_to_audio(mel_power, sr=sr, n_fft=n_fft, hop_length=hop_length,
                                                    win_length=win_length, fmin=self.cfg.f_min,
                                                    fmax=self.cfg.f_max, power=2.0)
