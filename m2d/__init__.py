"""Masked Modeling Duo (M2D): self-supervised audio representations.

    from m2d import RuntimeM2D
    runtime = RuntimeM2D(weight_file='m2d_vit_base-80x608p16x16-220930-mr7/checkpoint-300.pth')
    frames = runtime.encode(audio)   # [B, S] 16 kHz -> [B, T, 3840]

The library by stage: m2d.audio (audio files, the log-mel front end), m2d.model (the networks),
m2d.checkpoint (weight files), m2d.train (pre-training), m2d.runtime (RuntimeM2D), m2d.eval,
m2d.hear (the HEAR API), m2d.tools and m2d.cli (the `m2d` commands). See docs/architecture.md.
"""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version('m2d')
except PackageNotFoundError:  # run from a checkout that was never installed
    __version__ = '0+unknown'


def __getattr__(name: str):
    # RuntimeM2D is imported on first use: `import m2d.tools.wav_to_lms` need not load the model code.
    if name in ('RuntimeM2D', 'Config'):
        from m2d.runtime import runtime
        return getattr(runtime, name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


__all__ = ['RuntimeM2D', 'Config', '__version__']
