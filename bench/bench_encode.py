"""Encoding throughput of RuntimeM2D (batched chunks) against a plain chunk-by-chunk loop.

    python bench/bench_encode.py                        # ViT-B 80x608, 16 x 10 s clips
    python bench/bench_encode.py --bf16 --compile --device cuda

Random weights (no downloads), encoder only. Both paths start from the same normalised LMS
(the log-mel front end is common to both and not timed). The plain loop is what the published
runtime did: one forward pass per chunk of W frames, with an extra all-padding chunk when the
input is an exact multiple of W. Prints clips/s for B x `--seconds` clips and for inputs of
exactly 2W frames, the max abs deviation of ours from the plain loop (~1e-6: float rounding
only), and with --bf16/--compile the deviation of those fast paths from fp32.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from einops import rearrange

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from m2d.runtime_audio import RuntimeM2D  # noqa: E402


def plain_loop(rt: RuntimeM2D, lms: torch.Tensor) -> torch.Tensor:
    """The published chunk loop: LMS [B, 1, F, T] -> frames [B, ceil(T/pt), D']."""
    W, pt = rt.cfg.input_size[1], rt.cfg.patch_size[1]
    pad = W - lms.shape[-1] % W  # W (a whole padding chunk) when T is a multiple of W
    x = torch.nn.functional.pad(lms, (0, pad))
    frames = []
    for i in range(x.shape[-1] // W):
        latent, *_ = rt.backbone.forward_encoder(x[..., i * W:(i + 1) * W], 0.0)
        frames.append(rearrange(latent[:, 1:], 'b (f t) d -> b t (f d)', f=rt.grid_f))
    x = torch.cat(frames, dim=1)
    return x[:, :x.shape[1] - int(W // pt * pad / W)]


def timed(fn, lms: torch.Tensor, repeats: int, device: torch.device) -> tuple[torch.Tensor, float]:
    """(output, best seconds per call) after one warm-up call."""
    def sync():
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
    with torch.inference_mode():
        out = fn(lms)
        times = []
        for _ in range(repeats):
            sync()
            start = time.perf_counter()
            fn(lms)
            sync()
            times.append(time.perf_counter() - start)
    return out.float(), min(times)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model', default='m2d_vit_base')
    p.add_argument('--input_size', default='80x608', help='model input FxT (published: 80x608)')
    p.add_argument('--patch_size', default='16x16')
    p.add_argument('--batch', type=int, default=16, help='clips per call')
    p.add_argument('--seconds', type=float, default=10.0, help='clip length')
    p.add_argument('--repeats', type=int, default=3, help='timed calls per case (best is reported)')
    p.add_argument('--threads', type=int, default=0, help='torch intra-op threads (0: torch default)')
    p.add_argument('--bf16', action='store_true', help='also time the bfloat16 autocast path')
    p.add_argument('--compile', action='store_true', help='also time the torch.compile path')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)

    def runtime(**fast) -> RuntimeM2D:
        name = f'{args.model}-{args.input_size}p{args.patch_size}-random'
        return RuntimeM2D(weight_file=name, encoder_only=True, **fast).to(device).eval()

    ours = runtime()
    W = ours.cfg.input_size[1]
    n_frames = 1 + int(args.seconds * ours.sample_rate) // ours.cfg.hop_size
    print(f'{args.model} {args.input_size} p{args.patch_size}, batch {args.batch}, device {device}, '
          f'threads {torch.get_num_threads()}, repeats {args.repeats} (best)')
    variants = {'bf16': dict(autocast_bf16=True), 'compile': dict(compile=True)}
    fast = {}
    for name, settings in variants.items():
        if getattr(args, name):
            fast[name] = runtime(**settings)
            fast[name].backbone.load_state_dict(ours.backbone.state_dict())
    for label, frames in ((f'{args.seconds:g} s clips ({n_frames} frames)', n_frames),
                          (f'exact 2W ({2 * W} frames)', 2 * W)):
        lms = torch.randn(args.batch, 1, ours.cfg.input_size[0], frames, device=device)
        mine, t_ours = timed(ours.encode_lms, lms, args.repeats, device)
        ref, t_plain = timed(lambda x: plain_loop(ours, x), lms, args.repeats, device)
        assert mine.shape == ref.shape, (mine.shape, ref.shape)
        print(f'{label:>28}: ours {args.batch / t_ours:8.2f} clips/s   plain {args.batch / t_plain:8.2f} clips/s   '
              f'x{t_plain / t_ours:.2f}   max |ours - plain| {(mine - ref).abs().max().item():.2e}')
        for name, rt in fast.items():
            out, t = timed(rt.encode_lms, lms, args.repeats, device)
            print(f'{name:>28}: ours {args.batch / t:8.2f} clips/s   x{t_ours / t:.2f} vs fp32   '
                  f'max |{name} - fp32| {(out - mine).abs().max().item():.2e} (feature std {mine.std().item():.2f})')


if __name__ == '__main__':
    main()
