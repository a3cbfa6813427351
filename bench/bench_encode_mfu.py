"""MFU of the runtime's encode: RuntimeM2D.encode_lms on 10 s clips at batch 64 (the GPU goal's case).

    python -m bench.bench_encode_mfu --device cuda       # fp32, bf16 and bf16 + torch.compile
    python -m bench.bench_encode_mfu --quick             # a tiny CPU check

ViT-B 80x608p16x16 with random weights, encoder only, from random normalised LMS (the log-mel front end
is not timed), as bench/bench_encode.py. Each setting: warm-up calls, then --calls timed calls (wall clock,
synchronised); clips/s, TFLOP/s and MFU from the FLOPs of one bf16 call counted by torch's FLOP counter
(what the runtime runs: a 10 s clip is two 608-frame chunks, the tail zero-padded, the padding's outputs
skipped in the last block); the max abs deviation from fp32 beside the features' std.
"""
import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Optional

import torch

from bench.bench_encode import RuntimeM2D  # (after its stand-in for a missing nnAudio: the front end is unused)
from bench.mfu import count_flops, device_name, fail, peak_tflops, release_memory, sync

SETTINGS = {'fp32': {}, 'bf16': dict(autocast_bf16=True), 'bf16-compile': dict(autocast_bf16=True, compile=True)}


def main(argv: Optional[list[str]] = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model', default='m2d_vit_base-80x608p16x16')
    p.add_argument('--seconds', type=float, default=10.0, help='clip length')
    p.add_argument('--batch', type=int, default=64, help='clips per call')
    p.add_argument('--settings', nargs='+', default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument('--calls', type=int, default=20, help='timed calls per setting')
    p.add_argument('--warmup', type=int, default=3, help='untimed calls first (compilation)')
    p.add_argument('--device', default='cuda')
    p.add_argument('--peak_tflops', type=float, default=None, help="dense bf16 peak (default: bench/mfu.py's table)")
    p.add_argument('--json', default=None, help='also write the rows to this JSON file')
    p.add_argument('--quick', action='store_true', help='tiny CPU check: ViT-Tiny-sized random weights, 2 clips')
    args = p.parse_args(argv)
    if args.quick:
        args.device, args.model, args.batch, args.calls, args.warmup = 'cpu', 'm2d_vit_tiny-80x608p16x16', 2, 2, 1
        args.settings = [s for s in args.settings if 'compile' not in s]
    device = torch.device(args.device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        fail('CUDA is not available here; pass --device cpu (or --quick)')
    peak = peak_tflops(device, args.peak_tflops)
    torch.manual_seed(0)
    reference = RuntimeM2D(weight_file=f'{args.model}-random', encoder_only=True).to(device).eval()
    frames = 1 + int(args.seconds * reference.sample_rate) // reference.cfg.hop_size
    lms = torch.randn(args.batch, 1, reference.cfg.input_size[0], frames,
                      generator=torch.Generator().manual_seed(0)).to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16):  # counted in bf16: on the CPU fp32 runs oneDNN's
        flops = count_flops(lambda: reference.encode_lms(lms[:1])) * args.batch  # linear, which it cannot see
    expected = reference.encode_lms(lms)
    print(f'{args.model} encode, {args.seconds:g} s clips ({frames} frames) x {args.batch} on {device_name(device)}, '
          f'torch {torch.__version__}; {flops / args.batch / 1e9:.1f} GFLOP/clip; '
          + (f'MFU against {peak:g} TFLOP/s' if peak else 'no MFU (no peak known)') + '\n')
    print('| setting | clips/s | ms/call (median) | TFLOP/s | MFU | max abs deviation from fp32 (feature std) |')
    print('|---|---|---|---|---|---|', flush=True)
    rows = []
    for name in args.settings:
        runtime = RuntimeM2D(weight_file=f'{args.model}-random', encoder_only=True, **SETTINGS[name]).to(device).eval()
        runtime.backbone.load_state_dict(reference.backbone.state_dict())
        for _ in range(args.warmup):
            out = runtime.encode_lms(lms)
        times = []
        for _ in range(args.calls):
            sync(device)
            start = time.perf_counter()
            out = runtime.encode_lms(lms)
            sync(device)
            times.append(time.perf_counter() - start)
        seconds = statistics.median(times)
        row = dict(setting=name, seconds=args.seconds, batch=args.batch, clips_per_s=args.batch / seconds,
                   ms_per_call=1000 * seconds, tflops=flops / seconds / 1e12,
                   max_abs_deviation=(out - expected).abs().max().item(), feature_std=expected.std().item())
        row['mfu'] = row['tflops'] / peak if peak else None
        rows.append(row)
        mfu = f'{100 * row["mfu"]:.1f}%' if peak else '-'
        print(f'| {name} | {row["clips_per_s"]:.1f} | {row["ms_per_call"]:.2f} | {row["tflops"]:.1f} | {mfu} | '
              f'{row["max_abs_deviation"]:.1e} ({row["feature_std"]:.2f}) |', flush=True)
        runtime = out = None
        release_memory(device)
        if args.json:
            Path(args.json).write_text(json.dumps(dict(device=device_name(device), torch=torch.__version__,
                                                       gflop_per_clip=flops / args.batch / 1e9, peak_tflops=peak,
                                                       rows=rows), indent=1))
    return rows


if __name__ == '__main__':
    main()
