"""RuntimeM2D's settings (Config): the model, how audio becomes features, the fast paths."""
from typing import Any

# Settings RuntimeM2D settles and also sets on the config object it was given, as the published runtime
# (which keeps the caller's object) does: EVAR reads feature_d and the front end from its own config.
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
    feature_d = 768 * 5    # settled by RuntimeM2D: D * F/pf, plus D with cls_token
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


def write_back(target: Any, cfg: Config) -> None:
    """Copy the settled RESOLVED_SETTINGS into the caller's config object (a dict, EasyDict or attribute object)."""
    for key in RESOLVED_SETTINGS:
        if isinstance(target, dict):
            target[key] = getattr(cfg, key)
        else:
            setattr(target, key, getattr(cfg, key))

