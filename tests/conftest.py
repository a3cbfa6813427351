"""Shared fixtures: tiny layout-faithful checkpoints and short audio, so tests run in seconds on CPU."""
import errno
import io
import os
import signal
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from m2d.model.vit import create_model

TINY = dict(depth=2, decoder_depth=2)


def make_checkpoint(root: Path, model: str = 'm2d_vit_tiny', input_size=(80, 208), patch_size=(16, 16),
                    seed: int = 0, wrap: bool = True, name: str = 'checkpoint-1.pth', **model_kwargs) -> Path:
    """Save a freshly initialised model in a folder named by the published format; return the file path."""
    torch.manual_seed(seed)
    kwargs = {**TINY, **model_kwargs}
    net = create_model(model, img_size=list(input_size), patch_size=list(patch_size), **kwargs)
    folder = Path(root) / f'{model}-{input_size[0]}x{input_size[1]}p{patch_size[0]}x{patch_size[1]}-000000-test'
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    torch.save({'model': net.state_dict()} if wrap else net.state_dict(), path)
    return path


@pytest.fixture(scope='session')
def tiny_ckpt(tmp_path_factory) -> Path:
    """A tiny M2D (D=192, 2 blocks, 80x208 input) checkpoint."""
    return make_checkpoint(tmp_path_factory.mktemp('ckpt'))


@pytest.fixture(scope='module')
def rt(tiny_ckpt):
    """A RuntimeM2D of the tiny checkpoint, shared by a test module."""
    from m2d.runtime.runtime import RuntimeM2D
    return RuntimeM2D(weight_file=str(tiny_ckpt))


def lms_batch(batch: int, frames: int, seed: int = 0) -> torch.Tensor:
    """Standard-normal LMS [batch, 1, 80, frames]."""
    return torch.from_numpy(np.random.default_rng(seed).standard_normal((batch, 1, 80, frames)).astype(np.float32))


@pytest.fixture
def audio_batch() -> torch.Tensor:
    """Three 3-second clips at 16 kHz in [-1, 1]: [3, 48000]."""
    return torch.from_numpy(np.random.default_rng(0).uniform(-1, 1, (3, 48000)).astype(np.float32))


@pytest.fixture
def one_thread():
    """Run the test with one intra-op thread (timing-independent numerics, no oversubscription)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_lms_dataset(root: Path, lengths=(150, 96, 60, 300) * 4, n_mels: int = 80, vis: int = 2,
                     seed: int = 0) -> Path:
    """LMS files (1, n_mels, T) for the given lengths under root/lms, a files.csv listing them and
    `vis` root/vis_samples/*.npy; returns root (the --data_path)."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    (root / 'lms').mkdir(parents=True, exist_ok=True)
    names = []
    for i, T in enumerate(lengths):
        name = f'lms/clip{i:03d}.npy'
        np.save(root / name, (rng.standard_normal((1, n_mels, T)) * 2 - 5).astype(np.float32))
        names.append(name)
    (root / 'files.csv').write_text('file_name\n' + '\n'.join(names) + '\n')
    if vis:
        (root / 'vis_samples').mkdir(exist_ok=True)
        for i in range(vis):
            vis = rng.standard_normal((1, n_mels, 120)) - 5
            np.save(root / 'vis_samples' / f'vis{i}.npy', vis.astype(np.float32))
    return root


@pytest.fixture
def lms_data(tmp_path) -> Path:
    """A small pre-training data folder (16 LMS files of 60-300 frames, files.csv, vis_samples)."""
    return make_lms_dataset(tmp_path / 'data')


def sparse_wav(path: Path, hours: float, sr: int = 16000) -> int:
    """A 16-bit mono WAV whose header and size say `hours` of audio, all of it a hole in a sparse file
    (no disk space used); -> the bytes its samples would take decoded as float32."""
    frames = int(hours * 3600 * sr)
    fmt = struct.pack('<HHIIHH', 1, 1, sr, 2 * sr, 2, 16)  # PCM, mono, rate, bytes/s, block align, bits
    header = b'RIFF' + struct.pack('<I', 36 + 2 * frames) + b'WAVE' + b'fmt ' + struct.pack('<I', 16) + fmt
    with open(path, 'wb') as f:
        f.write(header + b'data' + struct.pack('<I', 2 * frames))
        f.truncate(44 + 2 * frames)
    return 4 * frames


def peak_memory_of(argv: list[str], **kwargs) -> tuple[subprocess.CompletedProcess, int]:
    """Run `m2d ARGV...` in a fresh process; -> (the finished process, its peak resident memory in bytes).

    The peak is /proc's VmHWM of the process: getrusage's ru_maxrss would also count the peak of the
    pytest process that started it (Linux carries it over the vfork and exec of subprocess)."""
    code = ('import sys; from m2d.cli import main; status = main(sys.argv[1:]); '
            'peak = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:")); '
            'print(int(peak.split()[1]) * 1024, file=sys.stderr); sys.exit(status)')
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, '-c', code, *argv], capture_output=True, text=True, env=env, **kwargs)
    return done, int(done.stderr.splitlines()[-1])


def _sigint_as_in_a_terminal() -> None:
    # A test run started in the background inherits SIGINT ignored, and Python then never raises
    # KeyboardInterrupt: give the child SIGINT's default action, as in a terminal.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_as_in_a_terminal(cmd: list[str], **kwargs) -> subprocess.Popen:
    """Start `cmd` in its own process group, with Ctrl-C (SIGINT) acting as in a terminal; text mode."""
    return subprocess.Popen(cmd, text=True, start_new_session=True, preexec_fn=_sigint_as_in_a_terminal, **kwargs)


def press_ctrl_c(proc: subprocess.Popen, timeout: float) -> str:
    """SIGINT to the whole process group (what Ctrl-C in a terminal does); -> its stderr once it exits.
    A group still running after `timeout` s is killed, so a failing test leaves no processes behind."""
    os.killpg(proc.pid, signal.SIGINT)
    try:
        return proc.communicate(timeout=timeout)[1]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise


class FullDisk(io.BufferedWriter):
    """A file on a disk with `room` bytes free: the write that would go past it fails with ENOSPC."""
    room = 10_000

    def write(self, data) -> int:
        size = memoryview(data).nbytes
        if self.tell() + size > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().write(data)


def fill_disk_after_one_save(monkeypatch, module) -> list:
    """Make `module.save_npy_atomic` fail with ENOSPC from its second call on (a disk that fills up after one
    output); -> the list of paths it was called with."""
    real_save, saves = module.save_npy_atomic, []

    def full_after_one(array, path):
        saves.append(path)
        if len(saves) > 1:
            raise OSError(errno.ENOSPC, 'No space left on device')
        return real_save(array, path)

    monkeypatch.setattr(module, 'save_npy_atomic', full_after_one)
    return saves
