"""util.atomic: a failed write names its real cause and leaves the old file; temporary names fit any target name."""
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FullDisk

from m2d.errors import OutputError
from m2d.outputs import writing
from util.atomic import open_atomic, remove_stale_temp_files, save_atomic, save_npy_atomic

REPO = Path(__file__).resolve().parents[1]
SAVES = {'torch': (save_atomic, {'weights': torch.ones(50_000)}), 'numpy': (save_npy_atomic, np.ones(50_000))}


@pytest.mark.parametrize('kind', SAVES)
def test_a_full_disk_is_named_and_the_old_file_kept(kind, tmp_path, monkeypatch):
    save, obj = SAVES[kind]
    path = tmp_path / 'out.bin'
    path.write_bytes(b'the previous file')
    monkeypatch.setattr(os, 'fdopen', lambda fd, mode='r': FullDisk(io.FileIO(fd, mode)))
    with pytest.raises(OutputError) as e, writing(path):
        save(obj, path)
    assert str(e.value) == f'cannot write {path}: no space left on device'
    assert path.read_bytes() == b'the previous file' and os.listdir(tmp_path) == ['out.bin']


def test_a_real_failed_write_keeps_its_errno(tmp_path):
    """The same through the operating system: a file size limit (RLIMIT_FSIZE) makes the write fail with EFBIG."""
    code = ('import resource, signal, sys, numpy as np, torch\n'
            'from m2d.cli.common import guarded\n'
            'from m2d.outputs import writing\n'
            'from util.atomic import save_atomic, save_npy_atomic\n'
            'signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an error from write(), not a signal\n'
            'resource.setrlimit(resource.RLIMIT_FSIZE, (10_000, 10_000))\n'
            'def save(how, obj, path):\n'
            '    with writing(path):\n'
            '        how(obj, path)\n'
            'guarded(save, save_atomic, {"w": torch.ones(50_000)}, sys.argv[1])\n'
            'guarded(save, save_npy_atomic, np.ones(50_000), sys.argv[2])\n')
    done = subprocess.run([sys.executable, '-c', code, str(tmp_path / 'a.pth'), str(tmp_path / 'b.npy')],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.stderr.splitlines() == [f'error: cannot write {tmp_path / "a.pth"}: file too large',
                                        f'error: cannot write {tmp_path / "b.npy"}: file too large']
    assert os.listdir(tmp_path) == []


def test_temporary_names_fit_the_longest_target_names(tmp_path):
    """A writer killed mid-write leaves its temporary file; names of 255 bytes (the usual limit) still
    get a legal temporary name, and remove_stale_temp_files still recognises it."""
    names = ['n' * 255, 'é' * 127 + '.', 'a.b.c.' * 40 + '.npy']
    code = ('import os, sys; from util.atomic import open_atomic\n'
            'writers = [open_atomic(path) for path in sys.argv[1:]]\n'
            'for writer in writers:\n'
            '    writer.__enter__().write(b"partial")\n'
            'os._exit(0)  # no cleanup, as after a kill\n')
    done = subprocess.run([sys.executable, '-c', code, *(str(tmp_path / n) for n in names)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    left = list(tmp_path.iterdir())
    assert len(left) == 3 and all(len(os.fsencode(p.name)) <= 255 for p in left)
    assert sorted(remove_stale_temp_files(tmp_path)) == sorted(left) and not list(tmp_path.iterdir())
    for name in names:
        with open_atomic(tmp_path / name) as f:
            f.write(name.encode())
        assert (tmp_path / name).read_bytes() == name.encode()
