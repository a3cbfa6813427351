"""Encoding throughput of RuntimeM2D against the published chunk loop, over clip lengths and batch sizes.

    python -m bench.bench_encode --threads 2              # CPU table (fp32, plus bf16/compile rows); ~30 min
    python -m bench.bench_encode --device cuda            # CUDA: the same table in fp32 and in bf16; ~3 min
    python -m bench.bench_encode --quick                  # a short check that it all runs

Random weights (no downloads), encoder only; nothing but torch, timm, einops and this repository.
Both paths start from the same random normalised LMS (the log-mel front end is common to both and
not timed). The plain loop is what the published runtime did: one forward pass per chunk of W
frames (W=608: 6.07 s), the last one zero-padded to W, plus an all-padding chunk when the input is
an exact multiple of W. Each case alternates calls (warm-up, then ours, plain, ours, plain, ...)
so that a busy machine slows both alike; it prints the median clips/s of each with their range,
the median and range of the per-pair speed ratio (wall clock, and CPU time of this process on
CPU), and the max abs deviation of ours from the plain loop. bf16 rows run both paths under
bfloat16 autocast; the compile row is ours with compile=True against ours in fp32.
"""
import argparse
import statistics
import sys
import time
import types

import torch
from einops import rearrange


def _allow_missing_nnaudio() -> None:
    """Where nnAudio is not installed, give RuntimeM2D a front end that fails if called: this
    bench starts from LMS and never calls it."""
    try:
        import nnAudio.features  # noqa: F401
    except ImportError:
        class MelSpectrogram(torch.nn.Module):
            def __init__(self, **kwargs):
                super().__init__()

            def forward(self, audio):
                raise RuntimeError('nnAudio is not installed')
        features = types.ModuleType('nnAudio.features')
        features.MelSpectrogram = MelSpectrogram
        sys.modules.update({'nnAudio': types.SimpleNamespace(features=features), 'nnAudio.features': features})


_allow_missing_nnaudio()
from m2d.runtime.runtime import RuntimeM2D  # noqa: E402


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


def alternate(fns: dict, lms: torch.Tensor, device: torch.device, min_pairs: int, max_pairs: int,
              case_seconds: float, bf16: bool = False) -> tuple[dict, dict]:
    """Call each fn once to warm up, then in turn until min_pairs rounds are done and case_seconds
    have passed (at most max_pairs) -> (outputs, {name: [(wall s, CPU s), ...]})."""
    def call(fn):
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            if device.type == 'cuda':
                torch.cuda.synchronize(device)
            wall, cpu = time.perf_counter(), time.process_time()
            out = fn(lms)
            if device.type == 'cuda':
                torch.cuda.synchronize(device)
            return out.float(), (time.perf_counter() - wall, time.process_time() - cpu)
    start = time.perf_counter()
    outputs = {name: call(fn)[0] for name, fn in fns.items()}
    times = {name: [] for name in fns}
    for rounds in range(1, max_pairs + 1):
        for name, fn in fns.items():
            times[name].append(call(fn)[1])
        if rounds >= min_pairs and time.perf_counter() - start > case_seconds:
            break
    return outputs, times


def summary(batch: int, times: list) -> str:
    rates = [batch / wall for wall, _ in times]
    return f'{statistics.median(rates):.2f} ({min(rates):.2f}-{max(rates):.2f})'


def ratio(times: list, base: list, cpu: bool) -> str:
    r = [b[cpu] / t[cpu] for t, b in zip(times, base)]
    return f'x{statistics.median(r):.2f} ({min(r):.2f}-{max(r):.2f})'


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model', default='m2d_vit_base')
    p.add_argument('--input_size', default='80x608', help='model input FxT (published: 80x608)')
    p.add_argument('--patch_size', default='16x16')
    p.add_argument('--seconds', type=float, nargs='+', default=[1, 2, 5, 6.07, 10, 30, 60], help='clip lengths')
    p.add_argument('--batches', type=int, nargs='+', default=[1, 8], help='clips per call')
    p.add_argument('--min_pairs', type=int, default=3, help='timed (ours, plain) rounds per case, at least')
    p.add_argument('--max_pairs', type=int, default=None, help='... and at most (default: 9 on CPU, 31 on CUDA)')
    p.add_argument('--case_seconds', type=float, default=None,
                   help='keep alternating until this long per case (default: 20 on CPU, 3 on CUDA)')
    p.add_argument('--fast_case', default='10x8', help="clip seconds x batch of the bf16/compile rows ('': none)")
    p.add_argument('--no_compile', action='store_true', help='skip the torch.compile row')
    p.add_argument('--quick', action='store_true',
                   help='short check: 1, 6.07 and 10 s, batch 1 and 2, one pair, no compile')
    p.add_argument('--threads', type=int, default=0, help='torch intra-op threads (0: torch default)')
    p.add_argument('--device', default='cpu')
    args = p.parse_args(argv)
    cuda = args.device.startswith('cuda')
    args.max_pairs = args.max_pairs or (31 if cuda else 9)
    args.case_seconds = args.case_seconds if args.case_seconds is not None else (3.0 if cuda else 20.0)
    if args.quick:
        args.seconds, args.batches, args.min_pairs, args.max_pairs = [1, 6.07, 10], [1, 2], 1, 1
        args.fast_case, args.no_compile = '10x2', True
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)

    def runtime(**fast) -> RuntimeM2D:
        name = f'{args.model}-{args.input_size}p{args.patch_size}-random'
        return RuntimeM2D(weight_file=name, encoder_only=True, **fast).to(device).eval()

    ours = runtime()
    n_mels, W = ours.cfg.input_size
    precisions = ['fp32', 'bf16'] if device.type == 'cuda' else ['fp32']
    print(f'{args.model} {args.input_size} p{args.patch_size}, device {device}'
          + (f' ({torch.cuda.get_device_name(device)})' if device.type == 'cuda'
             else f', {torch.get_num_threads()} threads')
          + f', torch {torch.__version__}; {args.min_pairs}-{args.max_pairs} alternating pairs per case '
          f'(at least {args.case_seconds:g} s), medians with (min-max)', flush=True)
    print('\n| precision | clip | batch | ours clips/s | plain loop clips/s | ours / plain | '
          + ('ours / plain, CPU time | ' if device.type == 'cpu' else '') + 'max abs deviation |')
    print('|---|---|---|---|---|---|' + ('---|' if device.type == 'cpu' else '') + '---|')
    fast_seconds, fast_batch = (float(v) for v in args.fast_case.split('x')) if args.fast_case else (0, 0)
    fast_lms = None
    for precision in precisions:
        for seconds in args.seconds:
            for batch in args.batches:
                frames = 1 + int(seconds * ours.sample_rate) // ours.cfg.hop_size
                lms = torch.randn(batch, 1, n_mels, frames, device=device)
                if (seconds, batch) == (fast_seconds, fast_batch):
                    fast_lms = lms
                print(f'  {precision} {seconds:g} s x {batch} ...', file=sys.stderr, flush=True)
                out, t = alternate({'ours': ours.encode_lms, 'plain': lambda x: plain_loop(ours, x)}, lms, device,
                                   args.min_pairs, args.max_pairs, args.case_seconds, bf16=precision == 'bf16')
                assert out['ours'].shape == out['plain'].shape, (out['ours'].shape, out['plain'].shape)
                print(f'| {precision} | {seconds:g} s ({frames} frames) | {batch} | {summary(batch, t["ours"])} | '
                      f'{summary(batch, t["plain"])} | {ratio(t["ours"], t["plain"], False)} | '
                      + (f'{ratio(t["ours"], t["plain"], True)} | ' if device.type == 'cpu' else '')
                      + f'{(out["ours"] - out["plain"]).abs().max().item():.1e} |', flush=True)
    fast = {'bf16': dict(autocast_bf16=True)} if device.type == 'cpu' else {}
    if not args.no_compile:
        fast['compile'] = dict(compile=True)
    if not args.fast_case:
        fast = {}
    elif fast_lms is None:
        frames = 1 + int(fast_seconds * ours.sample_rate) // ours.cfg.hop_size
        fast_lms = torch.randn(int(fast_batch), 1, n_mels, frames, device=device)
    if fast:
        print(f'\nFast paths, {fast_seconds:g} s clips x {fast_batch:g}, against ours in fp32:\n')
        print('| setting | clips/s | fp32 clips/s | speed-up | max abs deviation from fp32 (feature std) |')
        print('|---|---|---|---|---|')
    for name, settings in fast.items():
        rt = runtime(**settings)
        rt.backbone.load_state_dict(ours.backbone.state_dict())
        print(f'  {name} ...', file=sys.stderr, flush=True)
        out, t = alternate({name: rt.encode_lms, 'fp32': ours.encode_lms}, fast_lms, device,
                           args.min_pairs, args.max_pairs, args.case_seconds)
        print(f'| {name} | {summary(fast_batch, t[name])} | {summary(fast_batch, t["fp32"])} | '
              f'{ratio(t[name], t["fp32"], False)} | {(out[name] - out["fp32"]).abs().max().item():.1e} '
              f'({out["fp32"].std().item():.2f}) |', flush=True)


if __name__ == '__main__':
    main()
