"""The main job (`m2d demo`, run by run_demo.sh) end to end at a tiny size, from a wheel installed outside
the clone and run from another folder: every command it runs (wav2lms, train with its built-in
evaluation, eval) and `m2d encode` work without the checkout."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from m2d.checkpoint import model_tag
from m2d.runtime.runtime import RuntimeM2D
from m2d.train.config import parse_args

REPO = Path(__file__).resolve().parents[1]


def installed_copy(target: Path) -> dict:
    """Build the wheel and install it (no dependencies: this interpreter has them) into `target`;
    -> the environment that runs it instead of the checkout."""
    def pip(*args: str) -> None:
        subprocess.run([sys.executable, '-m', 'pip', '-q', '--disable-pip-version-check', *args], check=True,
                       capture_output=True, timeout=300)

    wheels = target.parent / 'wheels'
    pip('wheel', '--no-deps', '--no-build-isolation', '-w', str(wheels), str(REPO))
    pip('install', '--no-deps', '--target', str(target), str(next(wheels.glob('m2d-*.whl'))))
    return {**os.environ, 'PYTHONPATH': str(target), 'OMP_NUM_THREADS': '2'}


def test_demo_runs_end_to_end_from_an_installed_wheel(tmp_path):
    env = installed_copy(tmp_path / 'site')
    work = tmp_path / 'elsewhere'
    work.mkdir()

    def m2d(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, '-m', 'm2d', *args], cwd=work, env=env, capture_output=True,
                              text=True, timeout=900)

    where = subprocess.run([sys.executable, '-c', 'import m2d; print(m2d.__file__, m2d.__version__)'], cwd=work,
                           env=env, capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(tmp_path / 'site')) and '0+unknown' not in where  # the wheel, not the checkout

    done = m2d('demo', '--out', 'demo', '--n_files', '24', '--epochs', '2', '--batch_size', '8', '--depth', '1',
               '--decoder_depth', '1')
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out, printed = work / 'demo', done.stdout
    recipe = parse_args(['--preset', 'small'])
    tag = model_tag(recipe)  # the run folders are named after the recipe's model
    checkpoint = out / 'runs' / f'{tag}-demo' / 'checkpoint-2.pth'
    assert len(list((out / 'data' / 'lms').rglob('*.npy'))) == 24
    assert (checkpoint.parent / 'vis-2.png').is_file() and (checkpoint.parent / 'log.txt').is_file()
    assert 'm2d eval suite --config all finished with exit status 0' in printed  # the built-in evaluation
    features = RuntimeM2D(weight_file=str(checkpoint)).encode(torch.zeros(1, 16000).uniform_(-1, 1))
    frames = 1 + 16000 // 160  # 1 s of LMS at a 10 ms hop
    assert features.shape == (1, -(-frames // recipe.patch_size[1]), 192 * 5)

    # Both evaluations land in the demo's own results file, on the demo task generated below --out.
    scores = pd.read_csv(out / 'results' / 'scores.csv')
    baseline = out / 'runs' / f'{tag}-random_init' / 'checkpoint-0.pth'
    assert sorted(scores.weight) == sorted([str(checkpoint), str(baseline)])
    assert (scores.task == 'demo').all() and scores.score.between(0, 1).all()
    assert (out / 'demo_task' / 'metadata.csv').is_file()
    for score in scores.score:
        assert f'{100 * score:.1f}%' in printed
    assert 'pre-trained M2D' in printed and 'random weights' in printed

    done = m2d('encode', str(checkpoint), str(out / 'audio'), 'embeddings')
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(list((work / 'embeddings').rglob('*.npy'))) == 24
    assert np.load(next((work / 'embeddings').rglob('*.npy'))).shape == (192 * 5,)
