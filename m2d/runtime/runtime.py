"""RuntimeM2D: load a pre-trained M2D-family checkpoint (or MSM-MAE/MAE) and turn audio into features.

    runtime = RuntimeM2D(weight_file='m2d_vit_base-80x608p16x16-220930-mr7/checkpoint-300.pth')
    frames = runtime.encode(batch_audio)          # [B, S] 16 kHz -> [B, ceil(T/16), 3840]

The model and its sizes come from explicit settings (RuntimeM2D(weight_file=..., model='m2d_vit_base',
input_size=[80, 608], patch_size=[16, 16])), else from the checkpoint (the training args it stores, and
its weights), else from its folder name (`<model>-<F>x<T>p<pf>x<pt>[p<sr>]-...`, see m2d.checkpoint).
A file name ending in `random` gives random weights. Files are read with the weights-only loader;
trust_checkpoint=True is the opt-in for files that need full unpickling.

LMS normalisation: first-release checkpoints (no stored `norm_stats`) normalise each batch with its own
mean and std, as the published runtime; later formats (stored `norm_stats`, a sample-rate part in the
folder name, M2D-AS/X/S/CLAP) and explicit stats (norm_stats=[mean, std], or EVAR's `mean`/`std`) use
fixed stats, and encode the last partial chunk alone with its own positions, as the later runtime.

In eval mode (the default) encoding runs under torch.inference_mode and returns ordinary tensors;
call .train() for gradients (and for the training mask, when one is set).
"""
import contextlib
import logging
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from timm.layers import resample_abs_pos_embed

from m2d.audio.lms import LogMelSpectrogram
from m2d.checkpoint import (
    DEFAULT_NORM_STATS,
    EXTRA_PARTS,
    FRONT_ENDS,
    PRETRAINING_PREFIXES,
    CheckpointParts,
    ModelSpec,
    backbone_model,
    describe,
    extract_state_dict,
    load_checkpoint,
    load_state_strict,
    parse_size,  # noqa: F401  (the size parser, also used from here)
    split_state,
)
from m2d.model.clap import TextEncoder, projection_from_state
from m2d.model.vit import M2DViT, MaskedAutoencoderViT, create_model
from m2d.runtime.inference import encode_inference

log = logging.getLogger(__name__)

AudioLike = Union[torch.Tensor, np.ndarray]
# Settings the runtime settles, written back into the config object it was given (e.g. EVAR's cfg).
RESOLVED_SETTINGS = ('model', 'input_size', 'patch_size', 'sr', 'sample_rate', 'n_fft', 'window_size', 'hop_size',
                     'n_mels', 'f_min', 'f_max', 'mean', 'std', 'feature_d', 'flat_features', 'encoder_only')


class Config:
    """Runtime settings. Any attribute can be set by keyword: Config(cls_token=True)."""
    weight_file = ''
    model = ''             # '' = from the checkpoint's args, else the folder name
    input_size = None      # [F, T]; None = from the checkpoint's args, else the folder name
    patch_size = None      # [pf, pt]; likewise
    depth = None           # encoder blocks; None = as many as the checkpoint has
    decoder_depth = None   # decoder blocks; None = as many as the checkpoint has
    sr = ''                # '16k' / '32k': the log-mel front end; '' = from the checkpoint or folder name (16k)
    feature_d = 768 * 5    # set by RuntimeM2D: D * F/pf, plus D with cls_token
    norm_stats = None      # [mean, std]: fixed LMS normalisation; None = the checkpoint's (later formats)
    mean = None            # fixed LMS mean and std for weights that store none (EVAR's config keys);
    std = None             #   set by RuntimeM2D whenever the stats are fixed, None for per-batch stats
    last_chunk = ''        # 'pad' (zero-pad to the model width) / 'trim'; '' = 'trim' with fixed stats, else 'pad'
    cls_token = False      # prepend the [CLS] output to every frame feature
    training_mask = 0.0    # > 0: structured token masking in training mode, flat token features
    flat_features = False  # [B, tokens, D] instead of [B, frames, D * F/pf]
    encoder_only = False   # ignore decoder/target weights (less memory; no reconstruct())
    dur_frames = None      # model width in frames: longer inputs in one piece (positions trimmed or resampled)
    num_classes = None     # add EVAR's task head (BatchNorm1d without affine + Linear), loaded when stored
    freeze_embed = False   # no gradients for the patch embedding (fine-tuning)
    text_encoder = ''      # M2D-CLAP: local folder of the Hugging Face text encoder (never downloaded)
    trust_checkpoint = False  # unpickle anything in the weight file: only for files you trust
    max_chunks_per_pass = 0  # input chunks per forward pass; 0: 8 on a CPU (cache-sized), 256 on a GPU (bounds memory)
    timestamp_hop_ms = 0.0  # get_timestamp_embeddings hop; 0 = the patch width (16 frames: 160 ms)
    autocast_bf16 = False  # fast path: encode under bfloat16 autocast
    compile = False        # fast path: torch.compile the encoder
    # Log-mel front end (a 32k sample-rate part switches to FRONT_ENDS['32k']).
    sample_rate = 16000
    n_fft = 400
    window_size = 400
    hop_size = 160
    n_mels = 80
    f_min = 50
    f_max = 8000

    def __init__(self, **kwargs):
        self.extra = {}  # the caller's other settings (e.g. EVAR's output_layers), readable as attributes
        for key, value in kwargs.items():
            if key not in CONFIG_SETTINGS:
                raise TypeError(f'Config has no setting {key!r}')
            setattr(self, key, value)

    def __getattr__(self, key: str) -> Any:
        extra = self.__dict__.get('extra', {})
        if key in extra:
            return extra[key]
        raise AttributeError(f'Config has no setting {key!r}')

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key, default)

    @classmethod
    def from_any(cls, cfg: Any = None) -> 'Config':
        """A fresh Config from None, a Config, a dict, or any object with attributes (e.g. EVAR's
        EasyDict); settings it does not know are kept in `extra`, and the given object is not modified."""
        if cfg is None:
            return cls()
        items = (dict(cfg) if isinstance(cfg, dict) else
                 {**cfg.extra, **{k: getattr(cfg, k) for k in CONFIG_SETTINGS}} if isinstance(cfg, Config) else
                 dict(vars(cfg)))
        new = cls(**{k: v for k, v in items.items() if k in CONFIG_SETTINGS})
        new.extra = {k: v for k, v in items.items() if k not in CONFIG_SETTINGS}
        return new

    def __repr__(self) -> str:
        return 'Config(' + ', '.join(f'{k}={getattr(self, k)!r}' for k in CONFIG_SETTINGS) + ')'


CONFIG_SETTINGS = tuple(k for k, v in vars(Config).items()
                        if not k.startswith('_') and not isinstance(v, (classmethod, type(Config.__init__))))


def adapt_positions(pos_embed: torch.Tensor, grid_f: int, width: int) -> torch.Tensor:
    """pos_embed [1, 1 + grid_f * T', D] -> [1, 1 + grid_f * width, D]: the first `width` patch columns,
    or bicubic resampling to more of them (as the later runtime's dur_frames)."""
    cls, tokens = pos_embed[:, :1], pos_embed[:, 1:]
    old_width = tokens.shape[1] // grid_f
    if width <= old_width:
        tokens = tokens.reshape(1, grid_f, old_width, -1)[:, :, :width].reshape(1, grid_f * width, -1)
        return torch.cat([cls, tokens], dim=1)
    return resample_abs_pos_embed(pos_embed, [grid_f, width], [grid_f, old_width], antialias=False)


def build_backbone(cfg: Config) -> tuple[MaskedAutoencoderViT, ModelSpec, CheckpointParts]:
    """Settle the model cfg names (see m2d.checkpoint.describe), create it and load its weights.

    Fills cfg.model/input_size/patch_size/sr. Encoder and decoder depths follow the checkpoint; a
    checkpoint without decoder weights (or cfg.encoder_only, or cfg.dur_frames) gives an encoder-only
    model. -> (model, spec, the checkpoint's parts; those besides the backbone are the caller's).
    """
    path = Path(cfg.weight_file)
    random_weights = path.name.endswith('random')
    checkpoint = None if random_weights else load_checkpoint(path, trust=cfg.trust_checkpoint)
    parts = None if random_weights else split_state(extract_state_dict(checkpoint, path))
    spec = describe(path, checkpoint, parts, model=cfg.model, input_size=cfg.input_size, patch_size=cfg.patch_size,
                    depth=cfg.depth, decoder_depth=cfg.decoder_depth, sr=cfg.sr, norm_stats=cfg.norm_stats)
    cfg.model, cfg.input_size, cfg.patch_size, cfg.sr = spec.model, spec.input_size, spec.patch_size, spec.sr
    cfg.encoder_only = bool(cfg.encoder_only or cfg.dur_frames or spec.decoder_depth == 0)
    kwargs = dict(img_size=list(cfg.input_size), patch_size=cfg.patch_size, encoder_only=cfg.encoder_only)
    kwargs.update({k: v for k, v in (('depth', spec.depth), ('decoder_depth', spec.decoder_depth)) if v})
    state = None if parts is None else parts.model
    if random_weights:
        log.warning('Random weights: %s', path)
    elif cfg.encoder_only:
        state = {k: v for k, v in state.items() if not k.startswith(PRETRAINING_PREFIXES)}
    if cfg.dur_frames:
        grid_f, width = cfg.input_size[0] // cfg.patch_size[0], int(cfg.dur_frames) // cfg.patch_size[1]
        if state is not None:
            state['pos_embed'] = adapt_positions(state['pos_embed'], grid_f, width)
        cfg.input_size = kwargs['img_size'] = [cfg.input_size[0], int(cfg.dur_frames)]
    model = create_model(backbone_model(cfg.model), **kwargs)
    if state is not None:
        load_state_strict(model, state, f'{cfg.model}(input {cfg.input_size}, patch {cfg.patch_size}, {len(model.blocks)} '
                                        f'blocks{", encoder only" if cfg.encoder_only else ""})')
    log.info('Model: %s', spec)
    return model.eval(), spec, parts or CheckpointParts({})


def write_back(target: Any, cfg: Config) -> None:
    """Copy the settled RESOLVED_SETTINGS into the caller's config object (a dict, EasyDict or attribute object)."""
    for key in RESOLVED_SETTINGS:
        if isinstance(target, dict):
            target[key] = getattr(cfg, key)
        else:
            setattr(target, key, getattr(cfg, key))


class TaskHead(nn.Module):
    """EVAR's linear task head: clip embeddings [B, D] -> BatchNorm1d (no affine) -> Linear -> logits [B, C]."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.norm = nn.BatchNorm1d(dim, affine=False)
        self.linear = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.linear.weight, std=2e-5)
        nn.init.zeros_(self.linear.bias)

    def load_evar(self, state: dict[str, torch.Tensor]) -> None:
        """Load an EVAR fine-tuning head ('head.norm.*', 'head.mlp.mlp.0.*' with the prefix removed)."""
        load_state_strict(self, {k.replace('mlp.mlp.0.', 'linear.'): v for k, v in state.items()},
                          f'the task head ({self.linear.in_features} -> {self.linear.out_features}; EVAR linear head)')

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(x))


class RuntimeM2D(nn.Module):
    """Audio -> log-mel spectrogram -> M2D features.

    Args:
        cfg: a Config, dict or attribute object such as EVAR's EasyDict (missing settings take Config's
            defaults; other keys stay readable on runtime.cfg). The settled settings (RESOLVED_SETTINGS:
            model, sizes, front end, mean/std, feature_d, ...) are written back into it.
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

    # ----- encoder --------------------------------------------------------------------------------

    def _encode_chunks(self, lms: torch.Tensor, return_layers: bool, width: Optional[int] = None) -> list[torch.Tensor]:
        """LMS [B, 1, F, T] -> per-layer features [B, ceil(T / pt), D'] (flat: [B, tokens, D]) from chunks of
        W frames (`width`, default the model's) encoded in batched passes.

        The last chunk is right-padded with zeros to W and its padded frames are dropped, so a pass of
        such tail chunks computes only the real tokens' outputs in the last block (eval mode; flat
        features keep every token).
        """
        B, _, n_mels, T = lms.shape
        W, pt = width or self.cfg.input_size[1], self.cfg.patch_size[1]
        n_chunks = -(-T // W)  # a chunk made only of padding is never encoded
        chunks = F.pad(lms, (0, n_chunks * W - T)).reshape(B, 1, n_mels, n_chunks, W).permute(0, 3, 1, 2, 4)
        grid_t = W // pt  # a width that is no multiple of pt loses its last partial patch
        tail_frames = min(-(-(T - (n_chunks - 1) * W) // pt), grid_t)
        if tail_frames == grid_t or self.cfg.flat_features:
            groups = [(chunks, grid_t)]
        else:
            groups = [(chunks[:, :-1], grid_t), (chunks[:, -1:], tail_frames)]
        per_group = [[self._to_frames(latent, B, frames)
                      for latent in self._encode_group(group.reshape(-1, 1, n_mels, W), frames, return_layers)]
                     for group, frames in groups if group.shape[1]]
        return [torch.cat(layer, dim=1) for layer in zip(*per_group)]

    def _encode_group(self, chunks: torch.Tensor, frames: int, return_layers: bool) -> list[torch.Tensor]:
        """Chunks [M, 1, F, W] of which the first `frames` frames are wanted -> per-layer latents
        [M, 1+K', D] in batched passes (K' = grid_f * frames in eval mode, else all K tokens)."""
        mask_ratio = self.cfg.training_mask if self.training else 0.0
        # A structured training mask draws its row count once per pass, so every chunk must share
        # one pass for all of them to keep the same number of tokens. On a CPU, passes much larger
        # than 8 chunks (1528 tokens) ran slower: their activations outgrow the caches.
        chunks_per_pass = int(self.cfg.max_chunks_per_pass) or (8 if self.device.type == 'cpu' else 256)
        step = len(chunks) if mask_ratio > 0 else max(1, chunks_per_pass)
        grid_t = chunks.shape[-1] // self.cfg.patch_size[1]
        keep = None
        if frames < grid_t and not self.training:  # [CLS] and the tokens of the first `frames` frames in every row
            # Built on the device: copying it there would wait for the GPU to finish the passes before.
            rows = torch.arange(self.grid_f * grid_t, device=self.device).view(self.grid_f, grid_t)
            keep = F.pad(rows[:, :frames].flatten() + 1, (1, 0))
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

    def _split_last_chunk(self, lms: torch.Tensor) -> list[tuple[torch.Tensor, int]]:
        """(LMS, chunk width) parts to encode: all of it in chunks of the model width ('pad'), or with
        last_chunk 'trim' the whole chunks, then the rest padded to whole patches as one shorter chunk."""
        W, pt, T = self.cfg.input_size[1], self.cfg.patch_size[1], lms.shape[-1]
        if self.cfg.last_chunk == 'pad' or T % W == 0:
            return [(lms, W)]
        whole = T // W * W
        # Whole patches, but never wider than W (a W that is no multiple of pt, e.g. 1001, ends in a partial patch).
        rest = F.pad(lms[..., whole:], (0, min(-(T - whole) % pt, W - (T - whole))))
        return ([(lms[..., :whole], W)] if whole else []) + [(rest, rest.shape[-1])]

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
            parts = [self._encode_chunks(x, return_layers, width) for x, width in self._split_last_chunk(lms)]
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
        times the cost. As HEAR requires, timestamps are evenly spaced by the hop, each the centre of
        the pt frames its embedding starts (LMS frame i is centred at i * hop_size samples), and none
        lies past the end of the audio: the tail embeddings centred there are left out.
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
        # Flattened (frame, shift) order sorts the embeddings by start frame: the j-th starts at j * hop.
        frame_ms = 1000.0 * self.cfg.hop_size / self.cfg.sample_rate
        ts = (torch.arange(0, T, hop, dtype=torch.float64) + (pt - 1) / 2) * frame_ms
        # check_audio's one-patch minimum keeps the first centre inside the audio.
        ts = ts[ts <= 1000.0 * audio.shape[-1] / self.cfg.sample_rate]
        x = x[:, :len(ts)]
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
