"""What the speed benches share: the accelerator's dense bf16 peak, counted model FLOPs, phase timing with
CUDA events, peak memory, and out-of-memory handling. Needs nothing but torch (bench/bench_published.py
imports it next to the published code).

    python -m bench.mfu --device cuda     # the GPU, the peak MFU is measured against, and a measured bf16 rate

MFU (model FLOPs utilisation) = the FLOPs a step must do, counted by torch.utils.flop_counter on the
eager model (matrix products and convolutions; attention as explicit products, see count_flops), over
(step time x the accelerator's dense bf16 peak).
"""
import argparse
import contextlib
import gc
import json
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula, sdpa_flop_count

PHASES = ('data', 'forward', 'backward', 'optimizer', 'ema')  # of a training step

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, from NVIDIA's datasheets, which print twice these
# figures "with sparsity": H100 (SXM5 1,979, PCIe 1,513, NVL 1,671), H200 (SXM 1,979, NVL 1,671), A100 (624).
# First match of a fragment of torch.cuda.get_device_name() wins, so the specific names come first; torch
# names the SXM5 H100 'NVIDIA H100 80GB HBM3'.
PEAK_BF16_TFLOPS = (
    ('H200 NVL', 835.5),
    ('H200', 989.4),
    ('H100 NVL', 835.5),
    ('H100 PCIe', 756.5),
    ('H100', 989.4),
    ('A100', 312.0),
)


@register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu)
def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """The CPU's fused attention, which torch's FLOP counter leaves out: counted as on CUDA."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def fail(message: str) -> None:
    """A bench's bad input or missing piece: one line on stderr, exit status 2 (as m2d's command lines)."""
    print(f'error: {message}', file=sys.stderr)
    raise SystemExit(2)


def device_name(device: torch.device) -> str:
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    return f'CPU ({torch.get_num_threads()} threads)'


def peak_tflops(device: torch.device, override: Optional[float] = None) -> Optional[float]:
    """The dense bf16 peak MFU is measured against: `override` if given, else the table's entry for this
    GPU; None (no MFU) for the CPU and GPUs not in the table."""
    if override:
        return override
    if device.type != 'cuda':
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops for fragment, tflops in PEAK_BF16_TFLOPS if fragment in name), None)


@dataclass(frozen=True)
class Shape:
    """A model input: F x T crops cut into pf x pt patches, written like 80x608p16x16 (a square patch: p16)."""
    input_size: tuple[int, int]
    patch_size: tuple[int, int]

    @classmethod
    def parse(cls, text: str) -> 'Shape':
        try:
            size, patch = (tuple(int(v) for v in part.split('x')) for part in text.split('p'))
            patch = patch * 2 if len(patch) == 1 else patch
            if len(size) != 2 or len(patch) != 2 or min(*size, *patch) <= 0:
                raise ValueError
            return cls(size, patch)
        except ValueError:
            raise argparse.ArgumentTypeError(f'expected a shape like 80x608p16x16, got {text!r}') from None

    def __str__(self) -> str:
        return f'{self.input_size[0]}x{self.input_size[1]}p{self.patch_size[0]}x{self.patch_size[1]}'


def set_fused_attention(module: torch.nn.Module, fused: bool) -> list[tuple[torch.nn.Module, bool]]:
    """Switch timm attention in `module` between SDPA (fused) and explicit products; -> (module, setting
    before) of each attention."""
    before = [(m, m.fused_attn) for m in module.modules() if hasattr(m, 'fused_attn')]
    for m, _ in before:
        m.fused_attn = fused
    return before


@contextlib.contextmanager
def unfused_attention(module: torch.nn.Module) -> Iterator[None]:
    """timm attention as explicit products (softmax(QK^T)V) for the duration, so a training step's FLOPs are
    counted alike on every device and as for the published model, whose attention is explicit products
    (torch's formula for a fused attention backward counts a little more)."""
    before = set_fused_attention(module, False)
    try:
        yield
    finally:
        for m, value in before:
            m.fused_attn = value


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of fn() (forward and, if fn runs it, backward), counted on the operations it runs."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


class PhaseTimer:
    """Times the phases of repeated steps: mark() at each phase boundary, after start(). On CUDA the marks are
    events recorded on the stream, so the times are the GPU's, with no synchronisation inside a step; on the
    CPU they are wall-clock times. Read means() after the last step (it synchronises)."""

    def __init__(self, device: torch.device, phases: tuple[str, ...]):
        self.device, self.phases = device, phases
        self.steps: list[list] = []

    def _now(self):
        if self.device.type == 'cuda':
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def start(self) -> None:
        self.steps.append([self._now()])

    def mark(self) -> None:
        self.steps[-1].append(self._now())

    def means(self) -> dict[str, float]:
        """Mean milliseconds of each phase over the steps."""
        sync(self.device)
        totals = dict.fromkeys(self.phases, 0.0)
        for marks in self.steps:
            assert len(marks) == len(self.phases) + 1, 'one mark per phase after start()'
            for phase, a, b in zip(self.phases, marks, marks[1:]):
                totals[phase] += a.elapsed_time(b) if self.device.type == 'cuda' else 1000 * (b - a)
        return {phase: total / max(len(self.steps), 1) for phase, total in totals.items()}


def reset_peak_memory(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> Optional[float]:
    """Peak memory allocated by tensors since reset_peak_memory (CUDA only; None on the CPU)."""
    return torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == 'cuda' else None


def release_memory(device: torch.device) -> None:
    """Give back what a finished or failed configuration left in the caching allocator."""
    gc.collect()
    if device.type == 'cuda':
        torch.cuda.empty_cache()


def timed_row(make_step: Callable[[], Callable], device: torch.device, batch: int, steps: int, warmup: int,
              flops: int, peak: Optional[float], after: Optional[Callable[[Callable, dict], None]] = None) -> dict:
    """One configuration of a bench: make_step() builds it (a callable running one training step, taking an
    optional PhaseTimer and returning the loss); `warmup` untimed steps, then `steps` timed ones with the
    phase split -> its row: samples/s, step ms, phases, peak GiB, TFLOP/s, MFU (None without a peak), loss;
    status 'ok', 'OOM' or 'error: ...' (a failed configuration must not stop the table). after(step, row)
    adds to an ok row while the step still exists. The memory goes back before the next configuration."""
    release_memory(device)
    reset_peak_memory(device)
    torch.manual_seed(0)
    row = dict(status='ok')
    step = None
    try:
        step = make_step()
        for _ in range(warmup):
            step()
        sync(device)
        timer = PhaseTimer(device, PHASES)
        start = time.perf_counter()
        for _ in range(steps):
            loss = step(timer)
        sync(device)
        seconds = (time.perf_counter() - start) / steps
        row.update(samples_per_s=batch / seconds, step_ms=1000 * seconds, phases_ms=timer.means(),
                   peak_gib=peak_memory_gib(device), tflops=flops * batch / seconds / 1e12, loss=float(loss))
        row['mfu'] = row['tflops'] / peak if peak else None
        if after is not None:
            after(step, row)
    except torch.OutOfMemoryError:
        row['status'] = 'OOM'
    except Exception as e:
        row['status'] = f'error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}'
    step = loss = None  # noqa: F841  (the last references)
    release_memory(device)
    return row


def matmul_tflops(device: torch.device, n: int = 8192, repeats: int = 10) -> float:
    """bf16 TFLOP/s of an n x n x n matrix product on random data (the achievable ceiling, beside the peak)."""
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * n ** 3 * repeats / (time.perf_counter() - start) / 1e12


def random_batch(batch: int, input_size: tuple[int, int], seed: int = 0) -> torch.Tensor:
    """The benches' input [batch, 1, F, T]: the same values for the same sizes, in every bench."""
    return torch.randn(batch, 1, *input_size, generator=torch.Generator().manual_seed(seed))


def format_row(row: dict) -> str:
    """A markdown table row (see HEADER)."""
    head = f'| {row["shape"]} | {row["setting"]}{" (sweep)" if row.get("sweep") else ""} | {row["batch"]} |'
    if row['status'] != 'ok':
        return head + f' {row["status"]} |' + ' |' * 10
    p = row['phases_ms']
    mfu = f'{100 * row["mfu"]:.1f}%' if row['mfu'] is not None else '-'
    peak = f'{row["peak_gib"]:.1f}' if row['peak_gib'] is not None else '-'
    return (head + f' {row["samples_per_s"]:.1f} | {row["step_ms"]:.1f} | '
            + ' | '.join(f'{p[k]:.1f}' for k in PHASES)
            + f' | {peak} | {row["gflop_per_sample"]:.1f} | {row["tflops"]:.1f} | {mfu} |')


HEADER = ('| shape | setting | batch | samples/s | step ms | data ms | forward ms | backward ms | optimizer ms '
          '| EMA ms | peak GiB | GFLOP/sample | TFLOP/s | MFU |\n|' + '---|' * 14)




def main(argv: Optional[list[str]] = None) -> dict:
    p = argparse.ArgumentParser(description='The device, its dense bf16 peak (this table) and a measured bf16 rate.')
    p.add_argument('--device', default='cuda')
    p.add_argument('--size', type=int, default=8192, help='n of the n x n x n bf16 matrix product')
    p.add_argument('--json', default=None, help='also write the figures to this JSON file')
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        fail('CUDA is not available here; pass --device cpu')
    info = dict(device=device_name(device), torch=torch.__version__, cuda=torch.version.cuda,
                peak_tflops=peak_tflops(device), size=args.size, matmul_tflops=matmul_tflops(device, args.size))
    print(f'{info["device"]}, torch {info["torch"]} (CUDA {info["cuda"]}): dense bf16 peak for MFU '
          f'{info["peak_tflops"]} TFLOP/s (datasheet); measured {args.size}^3 bf16 matrix product '
          f'{info["matmul_tflops"]:.1f} TFLOP/s')
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(info, f, indent=1)
    return info


if __name__ == '__main__':
    main()
