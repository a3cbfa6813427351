"""One GPU session for issue 21: every measurement it asks for, in one call of under 10 minutes.

    bash bench/gpu_session.sh                 # on the GPU machine (the device tool carries .whl and .published)
    bash bench/gpu_session.sh --cpu-smoke     # the same stages at toy sizes on the CPU: a test of this script
    bash bench/gpu_session.sh --stages run curves   # some stages only (a second call after a short first one)

Stages, in this order; each gets what time is left before --deadline, and a failed or timed-out stage is
reported and the next one runs:
  env        the GPU, driver, torch and packages; the bf16 peak MFU is measured against, and a measured
             8192^3 bf16 matrix product beside it
  bench      ours (bench_train): the bf16 batch sweep from 64 to the largest batch that fits, then bf16 +
             torch.compile (block by block, as --fast) and the published fp16 + GradScaler at that batch,
             for 80x608p16x16 and 80x200p16x4
  published  the published code's own step and loop (bench_published) at batch 64, 512 and our largest
  encode     the runtime's encode MFU, 10 s clips x 64: fp32, bf16, bf16 + torch.compile (bench_encode_mfu)
  data       a synthetic corpus (m2d.audio.synth) converted by `m2d wav2lms`, and its normalisation stats
  run        torchrun --nproc_per_node 1 train_audio.py --fast: stopped half-way (checkpoint), resumed, then
             the closing evaluation train_audio.py runs (the built-in suite: the demo task here)
  curves     the published path, seeds 0 and 1, on the same data and flags, against the run's --fast curve
             (bench/loss_curves.py: one PNG, a within-seed-noise verdict)
  bench64    ours at batch 64: fp32, fp16 + GradScaler, bf16 + compile, bf16 + whole-model compile + CUDA graphs
  extras     at the largest batch: bf16 + whole-model compile (against block by block), TF32, foreach AdamW,
             forced flash attention, explicit attention

Everything lands in --out ($OUT on the device machine, else ./gpu_session_out): summary.md (the tables, the
goals, the exact commands), session.log (every command's output), loss_curves.png, details.tar.gz (the
JSON of every table, run and console logs). summary.md is rewritten after every stage, so a session cut
short still returns what it measured. Work files (audio, LMS, checkpoints) stay in --work.
"""
import argparse
import contextlib
import datetime
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from util.cpu import usable_cores

REPO = Path(__file__).resolve().parents[1]
STAGES = ('env', 'bench', 'published', 'encode', 'data', 'run', 'curves', 'bench64', 'extras')
SHAPES = ('80x608p16x16', '80x200p16x4')
RESERVE = 25  # seconds kept for the summary and the archive after the last stage


@dataclass
class Sizes:
    """What differs between the GPU session and its CPU smoke test."""
    bench: list[str]          # bench_train / bench_published / bench_encode_mfu flags choosing device and model
    published: list[str]
    encode: list[str]
    model: list[str]          # train_audio.py: model, sizes, batch
    machine: list[str]        # train_audio.py: device and threads (never stored by a checkpoint)
    published_batches: list[int]  # bench_published's batches, besides the largest ones of the bench stage
    n_files: int
    seconds: tuple[float, float]
    crop_frames: int
    epochs: int
    stop_at: int
    workers: int
    deadline: float           # seconds for the whole session (0: none)
    caps: dict = field(default_factory=dict)  # per-stage time caps, seconds


GPU = Sizes(
    bench=['--device', 'cuda'], published=['--device', 'cuda', '--steps', '10', '--warmup', '3'],
    encode=['--device', 'cuda'],
    model=['--model', 'm2d_vit_base', '--input_size', '80x608', '--patch_size', '16x16', '--batch_size', '64'],
    machine=['--device', 'cuda'], published_batches=[64, 512], n_files=2048, seconds=(6.5, 10.0), crop_frames=608,
    epochs=10, stop_at=5, workers=8, deadline=550,
    caps=dict(env=40, bench=150, published=70, encode=70, data=70, run=200, curves=150, bench64=120, extras=90))
SMOKE = Sizes(  # a made-up peak of 1 TFLOP/s, so that the MFU and goal lines are written too
    bench=['--quick', '--peak_tflops', '1'], published=['--quick', '--peak_tflops', '1'],
    encode=['--quick', '--peak_tflops', '1'],
    model=['--model', 'm2d_vit_tiny', '--depth', '1', '--decoder_depth', '1', '--input_size', '80x96',
           '--patch_size', '16x16', '--batch_size', '4'],
    machine=['--device', 'cpu', '--threads', '1'], published_batches=[2], n_files=24, seconds=(1.0, 2.0),
    crop_frames=96, epochs=4, stop_at=2, workers=0, deadline=0,
    caps=dict(env=60, bench=400, published=120, encode=120, data=120, run=300, curves=300, bench64=400, extras=300))


class Session:
    """Runs the stages, keeps their commands, timings and notes, and writes the outputs."""

    def __init__(self, args: argparse.Namespace, sizes: Sizes):
        self.args, self.sizes = args, sizes
        self.out, self.work = Path(args.out).resolve(), Path(args.work).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        self.log = self.out / 'session.log'
        self.started = time.perf_counter()
        self.deadline = args.deadline if args.deadline is not None else sizes.deadline
        self.records: list[dict] = []  # per stage: name, status, seconds, commands, note
        self.env_lines: list[str] = []
        self.data = self.work / 'data'
        self.run_dir = self.work / 'run'
        self.eval_env = {'M2D_EVAL_DEMO': str(self.work / 'demo_task'),
                         'M2D_EVAL_RESULTS': str(self.work / 'results' / 'scores.csv'),
                         'M2D_EVAL_CACHE': str(self.work / 'eval_cache')}

    # ----- running things ------------------------------------------------------------------------

    def remaining(self) -> float:
        if not self.deadline:
            return float('inf')
        return self.deadline - (time.perf_counter() - self.started) - RESERVE

    def say(self, text: str) -> None:
        print(text, flush=True)
        with open(self.log, 'a') as f:
            f.write(text + '\n')

    def command(self, cmd: list[str], timeout: float, cwd: Optional[Path] = None, env: Optional[dict] = None) -> int:
        """Run cmd (its output appended to session.log) in its own process group, killed with all its
        children when `timeout` passes; -> exit status (124 on a timeout)."""
        self.current['commands'].append(shlex.join(cmd))
        with open(self.log, 'a') as f:
            f.write(f'\n$ {shlex.join(cmd)}\n')
            f.flush()
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=cwd or REPO, start_new_session=True,
                                    env={**os.environ, 'PYTHONUNBUFFERED': '1', **(env or {})})
            try:
                return proc.wait(timeout=max(timeout, 1))
            except subprocess.TimeoutExpired:
                for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
                    with contextlib.suppress(ProcessLookupError):  # it may have ended meanwhile
                        os.killpg(proc.pid, sig)
                    try:
                        proc.wait(timeout=grace)
                        break
                    except subprocess.TimeoutExpired:
                        continue
                f.write(f'(stopped after {timeout:.0f} s: out of time)\n')
                return 124

    def python(self, *args: str) -> list[str]:
        return [sys.executable, *args]

    def stage_time(self, name: str) -> float:
        return min(self.sizes.caps.get(name, 120), self.remaining())

    def run_stage(self, name: str) -> None:
        budget = self.stage_time(name)
        self.current = dict(name=name, status='skipped (no time left)', seconds=0.0, commands=[], note='')
        self.records.append(self.current)
        if budget < 15:
            self.say(f'[{name}] skipped: {self.remaining():.0f} s left')
            self.write_summary()
            return
        elapsed = time.perf_counter() - self.started
        self.say(f'[{name}] started ({budget:.0f} s at most; {elapsed:.0f} s into the session)')
        start = time.perf_counter()
        try:
            note = getattr(self, f'stage_{name}')(budget)
            self.current.update(status='ok', note=note or '')
        except StageFailed as e:
            self.current.update(status='failed', note=str(e))
        except Exception as e:  # a bug in this script must not lose the stages after it
            self.current.update(status='failed', note=f'{type(e).__name__}: {e}')
        self.current['seconds'] = time.perf_counter() - start
        self.say(f'[{name}] {self.current["status"]} in {self.current["seconds"]:.0f} s'
                 + (f': {self.current["note"]}' if self.current['note'] else ''))
        self.write_summary()

    def check(self, status: int, what: str) -> None:
        if status:
            raise StageFailed(f'{what} exited with status {status}' + (' (out of time)' if status == 124 else '')
                              + '; see session.log')

    # ----- the stages ----------------------------------------------------------------------------

    def stage_env(self, budget: float) -> str:
        """Versions here; the GPU's figures from a child process (this one never holds GPU memory)."""
        lines = [f'Date: {datetime.datetime.now():%Y-%m-%d %H:%M:%S}',
                 f'Python {platform.python_version()}, {packages()}']
        if not self.args.cpu_smoke and shutil.which('nvidia-smi'):
            smi = subprocess.run(['nvidia-smi', '--query-gpu=name,driver_version,memory.total,clocks.max.sm',
                                  '--format=csv,noheader'], capture_output=True, text=True)
            lines.append(f'nvidia-smi: {smi.stdout.strip() or smi.stderr.strip()}')
        self.env_lines = lines
        path = self.work / 'env.json'
        device, size = ('cpu', '1024') if self.args.cpu_smoke else ('cuda', '8192')
        self.check(self.command(self.python('-m', 'bench.mfu', '--device', device, '--size', size,
                                            '--json', str(path)), budget), 'bench.mfu')
        env = json.loads(path.read_text())
        self.env_lines = [lines[0], f'Device: {env["device"]}; torch {env["torch"]} (CUDA {env["cuda"]})', *lines[1:],
                          f'Dense bf16 peak used for MFU: {env["peak_tflops"]} TFLOP/s (bench/mfu.py, datasheet); '
                          f'measured {env["size"]}^3 bf16 matrix product: {env["matmul_tflops"]:.1f} TFLOP/s']
        return ''

    def largest_batches(self) -> dict[str, int]:
        """Per shape, the largest batch the bf16 sweep of the bench stage ran (from its JSON)."""
        rows = (load_json(self.work / 'bench_core.json') or {}).get('rows', [])
        largest: dict[str, int] = {}
        for r in rows:
            if r.get('sweep') and r['status'] == 'ok':
                largest[r['shape']] = max(largest.get(r['shape'], 0), r['batch'])
        return largest

    def stage_bench(self, budget: float) -> str:
        self.check(self.command(self.python('-m', 'bench.bench_train', *self.sizes.bench, '--settings', 'bf16-compile',
                                            'fp16-scaler', '--batches', 'max', '--deadline', str(budget - 60),
                                            '--json', str(self.work / 'bench_core.json')), budget), 'bench_train')
        return f'largest batches: {self.largest_batches()}'

    def stage_published(self, budget: float) -> str:
        largest = self.largest_batches()
        batches = sorted({*self.sizes.published_batches, *largest.values()})  # one process: each start costs seconds
        shapes = list(largest) or SHAPES
        self.check(self.command(self.python('-m', 'bench.bench_published', *self.sizes.published, '--shapes', *shapes,
                                            '--batches', *map(str, batches),
                                            '--json', str(self.work / 'published.json')), budget), 'bench_published')
        return ''

    def stage_encode(self, budget: float) -> str:
        self.check(self.command(self.python('-m', 'bench.bench_encode_mfu', *self.sizes.encode,
                                            '--json', str(self.work / 'encode.json')), budget), 'bench_encode_mfu')
        return ''

    def stage_data(self, budget: float) -> str:
        audio = self.work / 'audio'
        shutil.rmtree(audio, ignore_errors=True)
        shutil.rmtree(self.data, ignore_errors=True)
        workers = min(16, usable_cores())
        per_worker = -(-self.sizes.n_files // workers)
        jobs = [(audio / f'w{i:02d}', min(per_worker, self.sizes.n_files - i * per_worker), i, self.sizes.seconds)
                for i in range(workers) if i * per_worker < self.sizes.n_files]
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(write_clips, jobs))
        csv = self.data / 'files.csv'
        self.check(self.command(self.python('-m', 'm2d', 'wav2lms', str(audio), str(self.data / 'lms'),
                                            '--csv', str(csv), '--data_path', str(self.data)), budget), 'm2d wav2lms')
        from m2d.filelist import read_file_list
        from m2d.train.data import compute_norm_stats
        files = read_file_list(csv)
        mean, std, n = compute_norm_stats(files, self.data, self.sizes.crop_frames)
        (self.work / 'norm_stats.json').write_text(json.dumps([round(mean, 4), round(std, 4)]))
        return f'{len(files)} LMS files; normalisation stats {mean:.4f}, {std:.4f} from {n} crops'

    def train_flags(self, save_freq: int) -> list[str]:
        """The flags every training run of the session shares (data, model, schedule)."""
        stats = (self.work / 'norm_stats.json').read_text()
        return [*self.sizes.model, '--data_path', str(self.data), '--dataset', str(self.data / 'files.csv'),
                '--norm_stats', stats, '--epochs', str(self.sizes.epochs), '--warmup_epochs', '1',
                '--save_freq', str(save_freq), *self.machine_flags()]

    def machine_flags(self) -> list[str]:
        return [*self.sizes.machine, '--num_workers', str(self.sizes.workers), '--eval_after', '1000',
                '--print_freq', '8']

    def stage_run(self, budget: float) -> str:
        if not (self.work / 'norm_stats.json').is_file():
            raise StageFailed('no data: the data stage did not finish')
        for folder in (self.run_dir, self.work / 'results'):  # a new run, and only its evaluation in the results
            shutil.rmtree(folder, ignore_errors=True)
        torchrun = self.python('-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '1',
                               str(REPO / 'train_audio.py'))
        start = time.perf_counter()
        no_scripts = self.work / 'no_eval_scripts'  # the stopped run skips its evaluation; the resumed one runs it
        no_scripts.mkdir(exist_ok=True)
        first = [*torchrun, *self.train_flags(self.sizes.stop_at), '--fast', '--seed', '0', '--stop_at',
                 str(self.sizes.stop_at), '--output_dir', str(self.run_dir), '--eval_scripts', str(no_scripts)]
        self.check(self.command(first, budget, cwd=self.work, env=self.eval_env), 'the first torchrun')
        checkpoint = self.run_dir / f'checkpoint-{self.sizes.stop_at}.pth'
        if not checkpoint.is_file():
            raise StageFailed(f'the first run left no {checkpoint.name}')
        resume = [*torchrun, '--resume', str(checkpoint), '--data_path', str(self.data),
                  '--dataset', str(self.data / 'files.csv'), '--fast', *self.machine_flags()]
        self.check(self.command(resume, budget - (time.perf_counter() - start), cwd=self.work, env=self.eval_env),
                   'the resumed torchrun')
        return ''

    def stage_curves(self, budget: float) -> str:
        if not (self.run_dir / 'log.txt').is_file():
            raise StageFailed('no --fast run to compare with: the run stage did not finish')
        self.check(self.command(self.python('-m', 'bench.loss_curves', '--out', str(self.work / 'curves'),
                                            '--fast_run', str(self.run_dir), '--smooth', '2' if self.args.cpu_smoke
                                            else '16', *self.train_flags(self.sizes.epochs)),
                                budget, cwd=self.work), 'loss_curves')
        shutil.copy(self.work / 'curves' / 'loss_curves.png', self.out / 'loss_curves.png')
        return ''

    def stage_bench64(self, budget: float) -> str:
        settings = ['fp32', 'fp16-scaler', 'bf16-compile', 'bf16-compile-model-cudagraphs']
        batches = ['64'] if not self.args.cpu_smoke else ['2']
        self.check(self.command(self.python('-m', 'bench.bench_train', *self.sizes.bench, '--settings', *settings,
                                            '--batches', *batches, '--deadline', str(budget - 60),
                                            '--json', str(self.work / 'bench64.json')), budget), 'bench_train')
        return ''

    def stage_extras(self, budget: float) -> str:
        largest = self.largest_batches()
        shape = SHAPES[0] if not self.args.cpu_smoke else next(iter(largest), None)
        if shape is None or shape not in largest:
            raise StageFailed('no largest batch: the bench stage did not finish')
        settings = ['bf16-compile-model', 'tf32', 'bf16-foreach-adamw', 'bf16-flash', 'bf16-naive-attention']
        self.check(self.command(self.python('-m', 'bench.bench_train', *self.sizes.bench, '--shapes', shape,
                                            '--settings', *settings, '--batches', str(largest[shape]),
                                            '--deadline', str(budget - 30), '--json', str(self.work / 'extras.json')),
                                budget), 'bench_train')
        return ''

    # ----- outputs -------------------------------------------------------------------------------

    def write_summary(self) -> None:
        (self.out / 'summary.md').write_text(summary(self))

    def archive(self) -> None:
        """details.tar.gz: the JSON of every table and the text logs (no audio, LMS or checkpoints)."""
        keep = ('.json', '.log', '.txt', '.md', '.csv')
        with tarfile.open(self.out / 'details.tar.gz', 'w:gz') as tar:
            for path in sorted(self.work.rglob('*')):
                if (path.is_file() and path.suffix in keep and path.stat().st_size < 4_000_000
                        and 'lms' not in path.relative_to(self.work).parts[:2]):
                    tar.add(path, arcname=str(path.relative_to(self.work)))


class StageFailed(Exception):
    """A stage could not do its work; the message says why."""


def write_clips(job: tuple[Path, int, int, tuple[float, float]]) -> None:
    """One worker's share of the corpus: n clips of random lengths in `seconds`, seeded by `seed`."""
    folder, n, seed, seconds = job
    from m2d.audio.synth import write_corpus
    write_corpus(folder, n, seed=seed, seconds=seconds)


def packages() -> str:
    from importlib.metadata import PackageNotFoundError, version
    found = []
    for name in ('torch', 'timm', 'numpy', 'triton', 'nnAudio', 'soundfile'):
        try:
            found.append(f'{name} {version(name)}')
        except PackageNotFoundError:
            found.append(f'{name} missing')
    return ', '.join(found)


def load_json(path: Path) -> Optional[dict]:
    return json.loads(path.read_text()) if path.is_file() else None


def table(rows: list[dict]) -> str:
    from bench.mfu import HEADER, format_row
    return '\n'.join([HEADER, *map(format_row, rows)])


def goals(session: Session) -> list[str]:
    """The issue's goals against what was measured."""
    lines = []
    core = load_json(session.work / 'bench_core.json')
    published = load_json(session.work / 'published.json') or {}
    for shape, batch in session.largest_batches().items():
        ours = [r for r in (core or {}).get('rows', []) if r['shape'] == shape and r['batch'] == batch
                and r['status'] == 'ok' and r['setting'].startswith('bf16') and r['mfu'] is not None]
        theirs = [r for r in published.get('rows', []) if r['shape'] == shape and r['status'] == 'ok'
                  and r.get('loop_mfu') is not None]
        same = [r for r in theirs if r['batch'] == batch] or theirs
        text = f'- {shape}, batch {batch} (the largest the bf16 sweep fitted): '
        if ours:
            best = max(ours, key=lambda r: r['mfu'])
            met = 'met' if best['mfu'] >= 0.45 else 'NOT met'
            text += (f'ours {100 * best["mfu"]:.1f}% MFU ({best["setting"]}{" (sweep)" if best.get("sweep") else ""}, '
                     f'{best["samples_per_s"]:.0f} samples/s): goal >= 45% {met}')
        else:
            text += 'ours not measured'
        if same:
            r = max(same, key=lambda r: r['batch'])
            text += (f'; published train_one_epoch at batch {r["batch"]}: {100 * r["loop_mfu"]:.1f}% MFU '
                     f'({r["loop_samples_per_s"]:.0f} samples/s)')
        lines.append(text)
    encode = load_json(session.work / 'encode.json')
    if encode and encode.get('peak_tflops'):
        bf16 = [r for r in encode['rows'] if r['setting'].startswith('bf16')]
        if bf16:
            best = max(bf16, key=lambda r: r['mfu'])
            lines.append(f'- encode, {best["seconds"]:g} s clips x {best["batch"]}: {100 * best["mfu"]:.1f}% MFU '
                         f'({best["setting"]}, {best["clips_per_s"]:.0f} clips/s): goal >= 35% '
                         f'{"met" if best["mfu"] >= 0.35 else "NOT met"}')
    curves = load_json(session.work / 'curves' / 'loss_curves.json')
    if curves:
        lines.append(f'- loss curves: --fast gap {curves["fast_gap"]:.4f} against seed noise '
                     f'{curves["seed_noise"]:.4f}: '
                     + ('within seed noise' if curves['within_seed_noise'] else 'OUTSIDE seed noise')
                     + ' (loss_curves.png)')
    return lines or ['- nothing measured yet']


def run_report(session: Session) -> list[str]:
    """The torchrun run: its epochs, the resume, the closing evaluation."""
    out = []
    log = session.run_dir / 'log.txt'
    if log.is_file():
        out.append('| epoch | train loss | samples/s |\n|---|---|---|')
        for line in log.read_text().splitlines():
            e = json.loads(line)
            out.append(f'| {e["epoch"]} | {e["train_loss"]:.4f} | {e["train_samples_per_s"]:.1f} |')
    console = session.run_dir / 'console.txt'
    if console.is_file():
        keep = ('--fast on', 'Model ', 'Resumed from', 'Saved ', 'Effective batch', 'Linear evaluation summary', '| ',
                'Running ', 'm2d eval suite', 'all_eval.sh finished')
        picked = [line for line in console.read_text().splitlines() if line.startswith(keep) or ': accuracy' in line]
        out += ['', '```', *picked[-40:], '```']
    return out


def summary(session: Session) -> str:
    parts = [f'# GPU session (issue 21){" - CPU SMOKE TEST, toy sizes, no GPU" if session.args.cpu_smoke else ""}',
             '', *session.env_lines, '', f'Command: `bash bench/gpu_session.sh {" ".join(session.args.argv)}`'.rstrip(),
             '', '## Goals', '', *goals(session)]
    sections = [('Training step, ours: bf16 sweep, then bf16 + compile and fp16 + GradScaler at the largest batch',
                 ['bench_core.json']),
                ('The published step, on the same inputs', ['published.json']),
                ('Training step, ours at batch 64', ['bench64.json']),
                ('Ablations at the largest batch', ['extras.json'])]
    for title, names in sections:
        rows = [r for name in names for r in (load_json(session.work / name) or {}).get('rows', [])]
        if rows:
            parts += ['', f'## {title}', '', table(rows)]
            loops = [r for r in rows if 'loop_samples_per_s' in r]
            parts += [f'- published train_one_epoch loop, {r["shape"]} batch {r["batch"]}: '
                      f'{r["loop_samples_per_s"]:.1f} samples/s, {r["loop_tflops"]:.1f} TFLOP/s'
                      + (f', MFU {100 * r["loop_mfu"]:.1f}%' if r['loop_mfu'] is not None else '') for r in loops]
    encode = load_json(session.work / 'encode.json')
    if encode:
        def mfu(r: dict) -> str:
            return f'{100 * r["mfu"]:.1f}%' if r['mfu'] is not None else '-'
        parts += ['', f'## Encode (RuntimeM2D.encode_lms; {encode["gflop_per_clip"]:.1f} GFLOP/clip)', '',
                  '| setting | clip | batch | clips/s | ms/call | TFLOP/s | MFU | max abs deviation (feature std) |',
                  '|---|---|---|---|---|---|---|---|']
        parts += [f'| {r["setting"]} | {r["seconds"]:g} s | {r["batch"]} | {r["clips_per_s"]:.1f} '
                  f'| {r["ms_per_call"]:.2f} | {r["tflops"]:.1f} | {mfu(r)} '
                  f'| {r["max_abs_deviation"]:.1e} ({r["feature_std"]:.2f}) |' for r in encode['rows']]
    report = run_report(session)
    if report:
        parts += ['', '## The torchrun run (--fast; stopped, resumed, closing evaluation)', '', *report]
    parts += ['', '## Stages', '', '| stage | status | seconds | note |', '|---|---|---|---|']
    parts += [f'| {r["name"]} | {r["status"]} | {r["seconds"]:.0f} | {r["note"]} |' for r in session.records]
    parts += ['', '## Commands', '']
    parts += [f'- {r["name"]}: `{c}`' for r in session.records for c in r['commands']]
    return '\n'.join(parts) + '\n'


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--cpu-smoke', dest='cpu_smoke', action='store_true', help='toy sizes on the CPU')
    p.add_argument('--stages', nargs='+', choices=STAGES, default=list(STAGES))
    p.add_argument('--out', default=os.environ.get('OUT') or str(REPO / 'gpu_session_out'))
    p.add_argument('--work', default=None, help='work files (default: a folder below the temporary directory)')
    p.add_argument('--deadline', type=float, default=None,
                   help='seconds for the whole session (default: 550 on the GPU, none for --cpu-smoke)')
    args = p.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    args.work = args.work or str(Path(os.environ.get('TMPDIR', '/tmp')) / ('m2d-gpu-session'
                                                                         + ('-smoke' if args.cpu_smoke else '')))
    session = Session(args, SMOKE if args.cpu_smoke else GPU)
    session.say(f'GPU session: stages {" ".join(args.stages)}; out {session.out}; work {session.work}')
    for name in STAGES:
        if name in args.stages:
            session.run_stage(name)
    session.write_summary()
    session.archive()
    print('\n' + (session.out / 'summary.md').read_text())
    return 0 if all(r['status'] == 'ok' for r in session.records) else 1


if __name__ == '__main__':
    sys.exit(main())
