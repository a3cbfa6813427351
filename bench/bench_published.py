"""The published implementation's own training step, on the inputs bench/bench_train.py uses, with its MFU.

    python -m bench.bench_published --device cuda --batches 64 512    # reads .published/ (bench/gpu_prepare.sh)
    python -m bench.bench_published --quick                            # a tiny CPU check that it all runs

The published code (the first release of nttcslab/m2d, set up as its README describes) is never part of
this repository: bench/gpu_prepare.sh copies it into the ignored folder
.published/ with the timm 0.4.12 wheel it was written for, and this bench imports both from there (this
process imports nothing of this repository but bench/mfu.py: the published `m2d` and `util` packages
take those names). Shims, none of which changes a number: torch._six.inf and numpy.float, gone from
today's torch and numpy; on a machine without CUDA, torch.cuda.synchronize is a no-op (and the published
autocast and GradScaler disable themselves there: fp32).

Each row is the published step, its own calls in its own order (engine_pretrain_m2d.train_one_epoch's body):
the batch to the device, forward under torch.cuda.amp.autocast() (fp16) and loss.item(), its
NativeScalerWithGradNormCount (scaled backward; unscale, the gradient norm it computes every step, AdamW
step, scaler update), optimizer.zero_grad(), torch.cuda.synchronize() and the EMA update; the model is
the published m2d_vit_base (timm 0.4.12 blocks: attention as explicit products) with the published
AdamW on timm 0.4.12's weight-decay groups. The phase split is timed with CUDA events (the backward phase
ends where the scaler's unscale_ starts); then `loop` runs the published train_one_epoch itself over
--steps batches, timed by the clock, which is the published training speed. FLOPs are counted on the
published model, one sample, forward and backward; MFU as in bench/mfu.py.
"""
import argparse
import contextlib
import io
import json
import math
import sys
import time
import types
import warnings
from functools import partial
from pathlib import Path
from typing import Optional

import numpy as np
import torch

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
    sync,
    timed_row,
)

REPO = Path(__file__).resolve().parents[1]
TIMM_WHEEL = 'timm-0.4.12-py3-none-any.whl'


def import_published(root: Path) -> types.SimpleNamespace:
    """The published modules, from root/m2d (the source tree) and root/wheels (timm 0.4.12, imported from
    its wheel, a zip of pure Python). Raises SystemExit with one line when they are missing."""
    source, wheel = root / 'm2d', root / 'wheels' / TIMM_WHEEL
    if not (source / 'm2d' / 'models_mae.py').is_file() or not wheel.is_file():
        fail(f'the published implementation is not in {root} (needs m2d/m2d/models_mae.py and '
                         f'wheels/{TIMM_WHEEL}); make it with: bash bench/gpu_prepare.sh PUBLISHED_DIR')
    if 'm2d' in sys.modules or 'timm' in sys.modules:
        fail('this process already imported m2d or timm; run the published bench in its own process')
    # This repository's m2d and util packages would shadow the published ones.
    sys.path[:] = [str(source), str(wheel)] + [p for p in sys.path if Path(p or '.').resolve() != REPO]
    sys.modules.setdefault('torch._six', types.SimpleNamespace(inf=math.inf))
    if not hasattr(np, 'float'):
        np.float = float
    if not torch.cuda.is_available():
        torch.cuda.synchronize = lambda device=None: None
    # The published torch.cuda.amp calls are deprecated spellings of torch.amp's (same behaviour).
    warnings.filterwarnings('ignore', message=r'.*torch\.cuda\.amp\.')
    import timm
    import timm.optim.optim_factory as optim_factory

    import util.misc as misc
    from m2d import engine_pretrain_m2d, models_mae
    assert timm.__version__ == '0.4.12', timm.__version__
    return types.SimpleNamespace(models_mae=models_mae, engine=engine_pretrain_m2d, misc=misc,
                                 optim_factory=optim_factory, timm_version=timm.__version__)


def build_model(pub: types.SimpleNamespace, input_size: tuple[int, int], patch_size: tuple[int, int], tiny: bool):
    """The published model as its train_audio.py builds it (defaults: norm_pix_loss, norm_mse, last layer);
    tiny: the same class at ViT-Tiny width with one block each (for --quick)."""
    kwargs = dict(img_size=list(input_size), patch_size=list(patch_size), norm_pix_loss=True, loss_type='norm_mse',
                  target_layers=[])
    with contextlib.redirect_stdout(io.StringIO()):  # it prints its settings
        if tiny:
            return pub.models_mae.M2DViT(in_chans=1, embed_dim=192, depth=1, num_heads=3, decoder_embed_dim=128,
                                         decoder_depth=1, decoder_num_heads=4, mlp_ratio=4,
                                         norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), **kwargs)
        return pub.models_mae.m2d_vit_base(decoder_depth=8, **kwargs)


class PublishedStep:
    """The published model, optimizer and loss scaler for one batch size; calling it runs the published step."""

    def __init__(self, pub: types.SimpleNamespace, model: torch.nn.Module, batch: int, input_size: tuple[int, int],
                 device: torch.device, mask_ratio: float):
        self.pub, self.model, self.device, self.mask_ratio = pub, model.to(device), device, mask_ratio
        self.model.train(True)
        groups = pub.optim_factory.add_weight_decay(self.model, 0.05)
        self.optimizer = torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.95))  # the published get_optim
        self.loss_scaler = pub.misc.NativeScalerWithGradNormCount()
        host = random_batch(batch, input_size)
        self.host = host.pin_memory() if device.type == 'cuda' else host

    def __call__(self, timer: Optional[PhaseTimer] = None) -> float:
        mark = timer.mark if timer is not None else lambda: None
        scaler = self.loss_scaler._scaler
        unscale = scaler.unscale_
        if timer is not None:
            timer.start()
            scaler.unscale_ = lambda optimizer: (mark(), unscale(optimizer))[1]  # the end of backward
        try:
            samples = self.host.to(self.device, non_blocking=True)
            mark()
            with torch.cuda.amp.autocast():
                loss, *_ = self.model(samples, mask_ratio=self.mask_ratio)
            loss_value = loss.item()
            mark()
            self.loss_scaler(loss, self.optimizer, parameters=self.model.parameters(), update_grad=True)
            self.optimizer.zero_grad()
            torch.cuda.synchronize()
            mark()
            self.model.update_target_network(0.9999)
            mark()
        finally:
            scaler.unscale_ = unscale
        return loss_value

    def loop(self, steps: int) -> float:
        """Seconds the published train_one_epoch takes for `steps` batches (its output is swallowed)."""
        loader = [self.host] * steps
        args = argparse.Namespace(accum_iter=1, mask_ratio=self.mask_ratio, lr=1e-4, min_lr=0.0, warmup_epochs=1,
                                  epochs=100)
        sync(self.device)
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            self.pub.engine.train_one_epoch(self.model, loader, self.optimizer, self.device, 1, self.loss_scaler,
                                            lambda step: 0.9999, log_writer=None, args=args)
        sync(self.device)
        return time.perf_counter() - start


def measure(pub, build, input_size, batch: int, device: torch.device, args, flops: int, peak: Optional[float]) -> dict:
    """One batch size: warm-up, the timed split, then the timed published loop -> its row."""
    def loop(step: PublishedStep, row: dict) -> None:
        loop_seconds = step.loop(args.steps) / args.steps
        row.update(loop_samples_per_s=batch / loop_seconds, loop_tflops=flops * batch / loop_seconds / 1e12)
        row['loop_mfu'] = row['loop_tflops'] / peak if peak else None

    return timed_row(lambda: PublishedStep(pub, build(), batch, input_size, device, args.mask_ratio), device, batch,
                     args.steps, args.warmup, flops, peak, after=loop)


def main(argv: Optional[list[str]] = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--published', default=str(REPO / '.published'), help='folder bench/gpu_prepare.sh made')
    p.add_argument('--shapes', nargs='+', type=Shape.parse, default=None,
                   help='inputs as FxTpPFxPT (default: 80x608p16x16 80x200p16x4)')
    p.add_argument('--batches', nargs='+', type=int, default=None, help='batch sizes (default: 64 512)')
    p.add_argument('--mask_ratio', default=0.7, type=float)
    p.add_argument('--steps', default=20, type=int, help='timed steps (split), and the batches of the timed loop')
    p.add_argument('--warmup', default=5, type=int, help='untimed steps first')
    p.add_argument('--device', default='cuda')
    p.add_argument('--peak_tflops', default=None, type=float, help="dense bf16 peak (default: bench/mfu.py's table)")
    p.add_argument('--json', default=None, help='also write the rows to this JSON file')
    p.add_argument('--quick', action='store_true',
                   help='tiny CPU check: a 1-block ViT-Tiny of the published class (default 80x64p16x4, batch 2 and 4)')
    args = p.parse_args(argv)
    if args.quick:
        args.device, args.steps, args.warmup = 'cpu', 2, 1
        args.shapes, args.batches = args.shapes or [Shape.parse('80x64p16x4')], args.batches or [2, 4]
    args.shapes = args.shapes or [Shape.parse('80x608p16x16'), Shape.parse('80x200p16x4')]
    args.batches = args.batches or [64, 512]
    device = torch.device(args.device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        fail('CUDA is not available here; pass --device cpu (or --quick)')
    pub = import_published(Path(args.published))
    peak = peak_tflops(device, args.peak_tflops)
    info = dict(device=device_name(device), torch=torch.__version__, timm=pub.timm_version, peak_tflops=peak, rows=[])
    print(f'Published M2D step ({"ViT-Tiny, 1 block" if args.quick else "m2d_vit_base"}; timm {pub.timm_version}) on '
          f'{info["device"]}, torch {torch.__version__}; '
          + (f'MFU against {peak:g} TFLOP/s' if peak else 'no MFU (no peak known)')
          + f'; {args.steps} timed steps after {args.warmup}\n\n{HEADER}', flush=True)
    for shape in args.shapes:
        text, size, patch = str(shape), shape.input_size, shape.patch_size
        build = partial(build_model, pub, size, patch, args.quick)
        model = build().to(device)
        x = random_batch(1, size).to(device)
        flops = count_flops(lambda: model(x, mask_ratio=args.mask_ratio)[0].backward())
        model = x = None
        for batch in args.batches:
            row = dict(shape=text, setting='published (fp16 autocast + NativeScaler)', batch=batch,
                       gflop_per_sample=flops / 1e9)
            row.update(measure(pub, build, size, batch, device, args, flops, peak))
            info['rows'].append(row)
            print(format_row(row), flush=True)
            if row['status'] == 'ok':  # the published loop as it trains: its own train_one_epoch
                mfu = f'{100 * row["loop_mfu"]:.1f}%' if row['loop_mfu'] is not None else '-'
                print(f'| {text} | published train_one_epoch loop | {batch} | {row["loop_samples_per_s"]:.1f} | '
                      f'{1000 * batch / row["loop_samples_per_s"]:.1f} |' + ' |' * 7
                      + f' {row["loop_tflops"]:.1f} | {mfu} |', flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps(info, indent=1))
    return info['rows']


if __name__ == '__main__':
    main()
