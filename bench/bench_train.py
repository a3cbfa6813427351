"""Training throughput: samples/s of one full pre-training step (forward, backward, optimizer, EMA).

    python -m bench.bench_train                                   # m2d_vit_base 80x608, batch 64, CUDA
    python -m bench.bench_train --plain                           # the unoptimised baseline step
    python -m bench.bench_train --device cpu --model m2d_vit_tiny --depth 2 --input_size 80x208 --batch 8

The default step is the one train_audio.py runs: bf16 autocast on CUDA (fp32 on CPU), fused
scaled-dot-product attention, fused AdamW on CUDA, and a multi-tensor EMA update. --plain measures a
straightforward baseline: fp16 autocast with a GradScaler, naive attention (explicit softmax(QK^T)V),
per-tensor AdamW (foreach=False) and a per-parameter Python EMA loop. On CUDA the model FLOPs
utilisation (MFU) is reported against --peak_tflops.
"""
import argparse
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from m2d.model.vit import MODELS, create_model  # noqa: E402
from m2d.train.config import size_arg  # noqa: E402
from m2d.train.engine import Precision, forward_backward, optimizer_step, update_target  # noqa: E402


def python_ema(model: torch.nn.Module, decay: float) -> None:
    """Baseline EMA: one pair of small kernels per parameter."""
    if not hasattr(model, 'ema_pairs'):
        return
    with torch.no_grad():
        for online, target in zip(*model.ema_pairs()):
            target.mul_(decay).add_(online, alpha=1 - decay)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model', default='m2d_vit_base', choices=sorted(MODELS))
    p.add_argument('--depth', default=None, type=int, help='encoder depth (default 12)')
    p.add_argument('--decoder_depth', default=None, type=int, help="default: the model's (M2D 8, MSM-MAE 4)")
    p.add_argument('--input_size', default=[80, 608], type=size_arg)
    p.add_argument('--mask_ratio', default=0.7, type=float)
    p.add_argument('--batch', default=64, type=int)
    p.add_argument('--steps', default=20, type=int, help='timed steps')
    p.add_argument('--warmup', default=5, type=int, help='untimed steps first')
    p.add_argument('--threads', default=0, type=int, help='CPU threads (0 = torch default)')
    p.add_argument('--device', default='cuda')
    p.add_argument('--compile', action='store_true', help='torch.compile the model')
    p.add_argument('--plain', action='store_true', help='the unoptimised baseline step (see above)')
    p.add_argument('--peak_tflops', default=989.0, type=float,
                   help='accelerator peak dense bf16/fp16 TFLOP/s for MFU (989 = H100/H200 SXM)')
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        sys.exit('error: CUDA is not available; pass --device cpu')

    torch.manual_seed(0)
    kwargs = dict(img_size=args.input_size, norm_pix_loss=True)
    for name in ('depth', 'decoder_depth'):
        if getattr(args, name):
            kwargs[name] = getattr(args, name)
    model = create_model(args.model, **kwargs).to(device).train()
    cuda = device.type == 'cuda'
    params = [q for q in model.parameters() if q.requires_grad]
    if args.plain:
        for m in model.modules():
            if hasattr(m, 'fused_attn'):
                m.fused_attn = False
        precision = Precision(torch.float16 if cuda else None, device.type)
        optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05, foreach=False)
        ema = python_ema
    else:
        precision = Precision.from_flag('bf16' if cuda else None, device)
        optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05, fused=cuda)
        ema = update_target
    scaler = torch.amp.GradScaler(device.type, enabled=precision.use_scaler)
    net = torch.compile(model) if args.compile else model
    batch = torch.randn(args.batch, 1, *args.input_size, device=device)

    def step(m: torch.nn.Module) -> None:
        forward_backward(m, batch, args.mask_ratio, precision, scaler)
        optimizer_step(optimizer, scaler, params, clip_grad=0.0)
        ema(model, 0.9999)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    with FlopCounterMode(display=False) as counter:  # counted on the eager model: the same math
        step(model)
    flops = counter.get_total_flops()
    for _ in range(args.warmup):
        step(net)
    sync()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step(net)
    sync()
    elapsed = time.perf_counter() - t0

    per_s = args.batch * args.steps / elapsed
    achieved = flops * args.steps / elapsed / 1e12
    name = f'{args.model}{f" depth {args.depth}" if args.depth else ""} {args.input_size[0]}x{args.input_size[1]}'
    mode = 'plain' if args.plain else 'fast'
    dtype = precision.dtype or torch.float32
    print(f'{name}, batch {args.batch}, {mode} step ({dtype}{", compiled" if args.compile else ""}) on '
          f'{torch.cuda.get_device_name(device) if cuda else f"CPU ({torch.get_num_threads()} threads)"}')
    print(f'  {per_s:.1f} samples/s, {elapsed / args.steps * 1000:.1f} ms/step, '
          f'{flops / 1e9 / args.batch:.2f} GFLOP/sample (model FLOPs, forward + backward), {achieved:.2f} TFLOP/s')
    if cuda:
        print(f'  MFU {100 * achieved / args.peak_tflops:.1f}% (assuming a peak of {args.peak_tflops:g} TFLOP/s; '
              'set --peak_tflops for other accelerators)')
        print(f'  peak memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB')


if __name__ == '__main__':
    main()
