"""--fast: the fastest training settings whose numerics stay within seed noise of the published recipe's.

What --fast turns on, and nothing else (flags given on the command line win):

- bf16 autocast (--amp bf16) instead of the published fp16 autocast with a dynamic loss scaler. The same
  tensor-core rate, but no loss scaling: no unscale pass, no overflow checks, no skipped steps. bf16 has
  fp32's exponent range and 3 fewer mantissa bits than fp16; bench/loss_curves.py compares its loss curve
  with the published path's (docs/gpu-training.md).
- On CUDA, torch.compile (--compile), block by block (compile_blocks): the elementwise work around the
  matrix products in each transformer block (LayerNorm, GELU, bias and residual adds) fused into fewer
  kernels. Not on the CPU, where compiling takes minutes and compiled code measured slower than eager
  (bench/RESULTS.md, encoding speed on the CPU).

Already the defaults, with or without --fast: fused AdamW on CUDA (one kernel for all parameters), timm's
scaled-dot-product attention (flash kernels on H100/H200 in bf16), and the multi-tensor EMA update.
Left out: TF32 (under bf16 autocast no matrix product is left in fp32); CUDA graphs (torch.compile's
reduce-overhead mode: bench/bench_train.py measures it as bf16-compile-model-cudagraphs; it pays with
small batches only); max-autotune (minutes of tuning on each start).

Why block by block (regional compilation) rather than the whole model: the blocks are where the work
is, and all blocks of one width share one compiled graph (parameters are graph inputs), so compiling
takes seconds and does not grow with depth, where the whole M2D model (encoder, predictor and target:
32 blocks for ViT-B) is traced block after block; its only loss is the fusion across block boundaries.
bench/bench_train.py measures both (bf16-compile and bf16-compile-model).
"""
import torch
import torch.nn as nn
from timm.models.vision_transformer import Block

from m2d.train.config import TrainConfig

FAST_SETTINGS = {'cuda': dict(amp='bf16', compile=True), 'cpu': dict(amp='bf16')}


def apply_fast(config: TrainConfig, device: torch.device) -> TrainConfig:
    """The run's settings with --fast's for `device` filled in (see above); unchanged without --fast. An
    --amp given on the command line (or stored by a resumed checkpoint) wins."""
    if not getattr(config, 'fast', False):
        return config
    settings = dict(FAST_SETTINGS.get(device.type, FAST_SETTINGS['cpu']))
    if config.amp is not None:
        settings.pop('amp')
    return config.replace(**settings)


def describe(config: TrainConfig, device: torch.device) -> str:
    """One line saying what --fast set, for the run's console."""
    dtype = {'bf16': 'bf16', 'fp16': 'fp16 with a loss scaler', 'none': 'fp32'}.get(config.amp, config.amp)
    compiled = 'torch.compile' if config.compile else 'no torch.compile on the CPU'
    return f'--fast on {device.type}: {dtype} autocast, {compiled} (docs/gpu-training.md)'


def compile_blocks(model: nn.Module) -> nn.Module:
    """torch.compile each transformer block of `model` in place (nn.Module.compile: the state dict's keys stay
    as they are); -> model."""
    for module in model.modules():
        if isinstance(module, Block):
            module.compile()
    return model
