"""Training-step speed per setting and batch: samples/s, where a step's time goes, peak memory and MFU.

    python -m bench.bench_train --device cuda        # ViT-B 80x608p16x16 and 80x200p16x4; the settings below;
                                                     # batch 64 and the largest that fits
    python -m bench.bench_train --device cuda --shapes 80x608p16x16 --settings bf16-compile --batches 64 1024
    python -m bench.bench_train --quick              # a tiny CPU run through every path that needs no GPU
    python -m bench.bench_train --device cpu --batch 8 --steps 4 --warmup 1     # ViT-B on the CPU
    python -m bench.bench_train --device cpu --batch 8 --plain                  # the unoptimised baseline step

A step is what train_audio.py runs per batch, in five phases: data (the batch from pinned host memory to
the device), forward (under autocast), backward (through a GradScaler for fp16), optimizer (AdamW (0.9,
0.95) on timm's weight-decay groups: unscale, step, scaler update, zero the gradients) and EMA (the
target network's update). On CUDA each phase is timed by events recorded on the stream (means over the
timed steps; nothing waits inside a step); on the CPU by the clock. samples/s is wall-clock over the
timed steps. FLOPs are counted once per shape on one eager sample (forward and backward of the online
network and predictor, the target network's forward; attention counted as explicit products) and scaled
by the batch. MFU = FLOPs per step / (step time x the GPU's dense bf16 peak: bench/mfu.py, or --peak_tflops).

--batches takes numbers and `max`: the largest batch that fits, found by doubling from --sweep_from (64),
or the largest number given if larger, with the bf16 step (fp32 on the CPU) until memory runs out or
--max_batch; each doubling is a row of its own (marked `sweep`). A configuration that runs out of memory
is reported as OOM and the next one runs; with --deadline, configurations not started by then are
reported as skipped.
"""
import argparse
import contextlib
import json
import math
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from timm.optim import param_groups_weight_decay
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench.mfu import (
    HEADER,
    PhaseTimer,
    Shape,
    count_flops,
    device_name,
    fail,
    format_row,
    peak_tflops,
    random_batch,
    set_fused_attention,
    timed_row,
    unfused_attention,
)
from m2d.model.vit import MODELS, create_model
from m2d.train.engine import Precision, optimizer_step, update_target
from m2d.train.fast import compile_blocks
from util.atomic import open_atomic


@dataclass(frozen=True)
class Setting:
    """How a step runs. amp: none | fp16 (with a GradScaler, as published) | bf16. compile: '' (eager) | blocks
    (each transformer block, as train_audio.py --compile and --fast) | model (the whole model; with cudagraphs,
    in torch.compile's reduce-overhead mode, which replays CUDA graphs). adamw: fused (on CUDA; foreach on the CPU, as
    train_audio.py) | foreach | loop (one tensor at a time). attention: sdpa (torch picks the kernel: flash
    where it can) | flash | efficient | cudnn | math (SDPA forced to that kernel; eager only) | naive (explicit
    softmax(QK^T)V). ema: foreach (the model's multi-tensor update) | loop (one pair of kernels per tensor).
    tf32: TF32 matrix products for fp32 work (CUDA)."""
    amp: str
    compile: str = ''
    cudagraphs: bool = False
    adamw: str = 'fused'
    attention: str = 'sdpa'
    ema: str = 'foreach'
    tf32: bool = False


SETTINGS = {
    'fp32': Setting('none'),
    'tf32': Setting('none', tf32=True),
    'fp16-scaler': Setting('fp16'),  # the published recipe's precision
    'bf16': Setting('bf16'),
    'bf16-compile': Setting('bf16', compile='blocks'),  # --fast on CUDA
    'bf16-compile-model': Setting('bf16', compile='model'),
    'bf16-compile-model-cudagraphs': Setting('bf16', compile='model', cudagraphs=True),
    'fp16-scaler-compile': Setting('fp16', compile='blocks'),
    'bf16-foreach-adamw': Setting('bf16', adamw='foreach'),
    'bf16-flash': Setting('bf16', attention='flash'),
    'bf16-math-attention': Setting('bf16', attention='math'),
    'bf16-naive-attention': Setting('bf16', attention='naive'),
    'plain': Setting('fp16', adamw='loop', attention='naive', ema='loop'),  # the unoptimised baseline
}
SDPA_BACKENDS = {'flash': SDPBackend.FLASH_ATTENTION, 'efficient': SDPBackend.EFFICIENT_ATTENTION,
                 'cudnn': SDPBackend.CUDNN_ATTENTION, 'math': SDPBackend.MATH}
GPU_SETTINGS = ['fp32', 'fp16-scaler', 'bf16', 'bf16-compile', 'bf16-compile-model', 'bf16-compile-model-cudagraphs']
QUICK_SETTINGS = [name for name, s in SETTINGS.items() if not s.compile]


def loop_ema(model: torch.nn.Module, decay: float) -> None:
    """The baseline EMA: one pair of small kernels per parameter."""
    if hasattr(model, 'ema_pairs'):
        with torch.no_grad():
            for online, target in zip(*model.ema_pairs()):
                target.mul_(decay).add_(online, alpha=1 - decay)


def make_optimizer(model: torch.nn.Module, kind: str, device: torch.device) -> torch.optim.Optimizer:
    """AdamW as train_audio.py builds it (timm's groups: no decay on biases and 1-D parameters)."""
    if kind == 'fused' and device.type == 'cuda':
        options = dict(fused=True)
    else:
        options = dict(foreach=kind != 'loop')
    return torch.optim.AdamW(param_groups_weight_decay(model, 0.05), lr=1e-4, betas=(0.9, 0.95), **options)


class TrainStep:
    """One configuration's model, optimizer and input batch; calling it runs one training step."""

    def __init__(self, build: Callable[[], torch.nn.Module], shape: Shape, setting: Setting, batch: int,
                 device: torch.device, mask_ratio: float):
        self.device, self.mask_ratio = device, mask_ratio
        self.model = build().to(device).train()
        if setting.attention == 'naive':
            set_fused_attention(self.model, False)
        backend = SDPA_BACKENDS.get(setting.attention)
        self.attention = (lambda: sdpa_kernel(backend)) if backend is not None else contextlib.nullcontext
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.model, setting.adamw, device)
        self.precision = Precision.from_flag(setting.amp, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.precision.use_scaler)
        self.ema = update_target if setting.ema == 'foreach' else loop_ema
        self.cudagraphs = setting.cudagraphs
        self.net = self.model
        if setting.compile == 'blocks':
            compile_blocks(self.model)
        elif setting.compile == 'model':
            self.net = torch.compile(self.model, mode='reduce-overhead' if setting.cudagraphs else 'default')
        host = random_batch(batch, shape.input_size)
        self.host = host.pin_memory() if device.type == 'cuda' else host

    def __call__(self, timer: Optional[PhaseTimer] = None) -> torch.Tensor:
        mark = timer.mark if timer is not None else lambda: None
        if timer is not None:
            timer.start()
        if self.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        x = self.host.to(self.device, non_blocking=True)
        mark()
        with self.attention(), self.precision.autocast():
            loss = self.net(x, mask_ratio=self.mask_ratio)[0]
        mark()
        with self.attention():
            self.scaler.scale(loss).backward()
        mark()
        optimizer_step(self.optimizer, self.scaler, self.params, clip_grad=0.0)
        mark()
        self.ema(self.model, 0.9999)
        mark()
        return loss.detach()


def flops_per_sample(build: Callable[[], torch.nn.Module], shape: Shape, device: torch.device,
                     mask_ratio: float) -> int:
    """Model FLOPs of one sample's training step (forward and backward), counted on the eager model."""
    model = build().to(device).train()
    x = torch.randn(1, 1, *shape.input_size, device=device)
    with unfused_attention(model):
        return count_flops(lambda: model(x, mask_ratio=mask_ratio)[0].backward())


@contextlib.contextmanager
def tf32_matmuls(enabled: bool):
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled or before
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def measure(step_args: tuple, setting: Setting, batch: int, steps: int, warmup: int, flops: int,
            peak: Optional[float]) -> dict:
    """Run one configuration: warm-up steps, then timed ones -> its row (status 'ok', 'OOM' or 'error: ...')."""
    build, shape, device, mask_ratio = step_args
    torch.compiler.reset()  # each configuration compiles afresh (on-disk caches still help)

    def finite_loss(step: TrainStep, row: dict) -> None:
        if not math.isfinite(row['loss']):
            row['status'] = f'error: the loss is {row["loss"]}'

    with tf32_matmuls(setting.tf32):
        return timed_row(lambda: TrainStep(build, shape, setting, batch, device, mask_ratio), device, batch, steps,
                         warmup, flops, peak, after=finite_loss)


def batch_plan(batches: list[str]) -> tuple[list[int], bool]:
    """--batches -> (the numbers, whether `max` was asked for)."""
    numbers = [int(b) for b in batches if b != 'max']
    return numbers, len(numbers) < len(batches)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model', default='m2d_vit_base', choices=sorted(MODELS))
    p.add_argument('--depth', default=None, type=int, help='encoder depth (default 12)')
    p.add_argument('--decoder_depth', default=None, type=int, help="default: the model's (M2D 8, MSM-MAE 4)")
    p.add_argument('--shapes', nargs='+', type=Shape.parse, default=None,
                   help='inputs as FxTpPFxPT (default: 80x608p16x16 80x200p16x4; --input_size for one)')
    p.add_argument('--input_size', default=None, help='one shape: F x T (with --patch_size, default 16x16)')
    p.add_argument('--patch_size', default='16x16')
    p.add_argument('--settings', nargs='+', default=None, choices=sorted(SETTINGS),
                   help=f'default on CUDA: {" ".join(GPU_SETTINGS)}; on the CPU: fp32 bf16')
    p.add_argument('--plain', action='store_true', help="the unoptimised baseline step alone (--settings plain)")
    p.add_argument('--batches', nargs='+', default=None,
                   help="batch sizes and/or 'max' (default on CUDA: 64 max; on the CPU: 8)")
    p.add_argument('--batch', type=int, default=None, help='one batch size (--batches N)')
    p.add_argument('--sweep_from', type=int, default=64, help="first batch of the 'max' sweep, unless a larger "
                                                              'number is given in --batches')
    p.add_argument('--max_batch', type=int, default=4096, help="largest batch the 'max' sweep tries")
    p.add_argument('--mask_ratio', default=0.7, type=float)
    p.add_argument('--steps', default=20, type=int, help='timed steps per configuration')
    p.add_argument('--warmup', default=5, type=int, help='untimed steps first (compilation, CUDA graph capture)')
    p.add_argument('--sweep_steps', default=5, type=int, help="timed steps per row of the 'max' sweep")
    p.add_argument('--deadline', default=0.0, type=float,
                   help='seconds after which no configuration starts (0: none); the rest are reported as skipped')
    p.add_argument('--threads', default=0, type=int, help='CPU threads (0 = torch default)')
    p.add_argument('--device', default='cuda')
    p.add_argument('--peak_tflops', default=None, type=float,
                   help="dense bf16 peak for MFU (default: bench/mfu.py's table for the GPU; none on the CPU)")
    p.add_argument('--json', default=None, help='also write the rows to this JSON file (rewritten after each row)')
    p.add_argument('--quick', action='store_true',
                   help='tiny CPU check of every path that needs no GPU: a 1-block ViT-Tiny, two shapes, every '
                        "eager setting, batch 2 and a 'max' sweep to 8")
    args = p.parse_args(argv)
    if args.quick:
        args.device, args.model, args.depth, args.decoder_depth = 'cpu', 'm2d_vit_tiny', 1, 1
        args.shapes = args.shapes or [Shape.parse('80x64p16x4'), Shape.parse('80x96p16x16')]
        args.settings = args.settings or QUICK_SETTINGS
        args.batches, args.sweep_from, args.max_batch = args.batches or ['2', 'max'], 2, 8
        args.steps, args.warmup, args.sweep_steps = 2, 1, 1
    cuda = args.device.startswith('cuda')
    if args.input_size:
        args.shapes = [Shape.parse(f'{args.input_size}p{args.patch_size}')]
    args.shapes = args.shapes or [Shape.parse('80x608p16x16'), Shape.parse('80x200p16x4')]
    args.settings = ['plain'] if args.plain else args.settings or (GPU_SETTINGS if cuda else ['fp32', 'bf16'])
    args.batches = [str(args.batch)] if args.batch else args.batches or (['64', 'max'] if cuda else ['8'])
    try:
        batch_plan(args.batches)
    except ValueError:
        p.error(f"--batches takes whole numbers and 'max', got {' '.join(args.batches)}")
    return args


def main(argv: Optional[list[str]] = None) -> list[dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        fail('CUDA is not available here; pass --device cpu (or --quick)')
    started = time.perf_counter()
    peak = peak_tflops(device, args.peak_tflops)
    info = dict(device=device_name(device), torch=torch.__version__, model=args.model, depth=args.depth,
                decoder_depth=args.decoder_depth, peak_tflops=peak, rows=[])
    print(f'{args.model}{f" depth {args.depth}" if args.depth else ""} on {info["device"]}, torch {torch.__version__}; '
          + (f'MFU against a dense bf16 peak of {peak:g} TFLOP/s' if peak else 'no MFU (no peak known: --peak_tflops)')
          + f'; {args.steps} timed steps after {args.warmup} (sweep: {args.sweep_steps})\n', flush=True)
    print(HEADER, flush=True)

    def record(row: dict) -> None:
        info['rows'].append(row)
        print(format_row(row), flush=True)
        if args.json:
            with open_atomic(args.json, 'w') as f:
                json.dump(info, f, indent=1)

    numbers, want_max = batch_plan(args.batches)
    for shape in args.shapes:
        kwargs = dict(img_size=list(shape.input_size), patch_size=list(shape.patch_size), norm_pix_loss=True)
        kwargs.update({k: getattr(args, k) for k in ('depth', 'decoder_depth') if getattr(args, k)})
        step_args = (lambda kw=kwargs: create_model(args.model, **kw), shape, device, args.mask_ratio)
        flops = flops_per_sample(step_args[0], shape, device, args.mask_ratio)

        def run(setting_name: str, batch: int, steps: int, sweep: bool = False) -> dict:
            row = dict(shape=str(shape), setting=setting_name, batch=batch, sweep=sweep,
                       gflop_per_sample=flops / 1e9)
            if args.deadline and time.perf_counter() - started > args.deadline:
                row['status'] = 'skipped (time)'
            else:
                row.update(measure(step_args, SETTINGS[setting_name], batch, steps, args.warmup, flops, peak))
            record(row)
            return row

        batches = list(numbers)
        if want_max:
            sweep_setting = 'bf16' if device.type == 'cuda' else 'fp32'
            batch, largest = max([args.sweep_from, *numbers]), None
            while batch <= args.max_batch and run(sweep_setting, batch, args.sweep_steps, sweep=True)['status'] == 'ok':
                largest, batch = batch, batch * 2
            if largest is not None and largest not in batches:
                batches.append(largest)
        for batch in batches:
            for name in args.settings:
                run(name, batch, args.steps)
    measured = [r for r in info['rows'] if r['status'] == 'ok' and r['mfu'] is not None]
    if measured:
        best = max(measured, key=lambda r: r['mfu'])
        print(f'\nBest MFU: {100 * best["mfu"]:.1f}% ({best["setting"]}, {best["shape"]}, batch {best["batch"]}: '
              f'{best["samples_per_s"]:.0f} samples/s)')
    print(f'({time.perf_counter() - started:.0f} s)')
    return info['rows']


if __name__ == '__main__':
    main()
