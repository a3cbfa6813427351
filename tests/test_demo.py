"""The main job (python -m m2d.tools.demo, run by run_demo.sh) end to end, at a tiny size."""
import pandas as pd
import torch

from m2d.checkpoint import model_tag
from m2d.runtime.runtime import RuntimeM2D
from m2d.tools.demo import main
from m2d.train.config import parse_args


def test_demo_runs_end_to_end_below_out(tmp_path, capfd):
    assert main(['--out', str(tmp_path), '--n_files', '24', '--epochs', '2', '--batch_size', '8', '--depth', '1',
                 '--decoder_depth', '1']) == 0
    printed = capfd.readouterr().out

    recipe = parse_args(['--preset', 'small'])
    tag = model_tag(recipe)  # the run folders are named after the recipe's model
    checkpoint = tmp_path / 'runs' / f'{tag}-demo' / 'checkpoint-2.pth'
    assert len(list((tmp_path / 'data' / 'lms').rglob('*.npy'))) == 24
    assert (checkpoint.parent / 'vis-2.png').is_file() and (checkpoint.parent / 'log.txt').is_file()
    features = RuntimeM2D(weight_file=str(checkpoint)).encode(torch.zeros(1, 16000).uniform_(-1, 1))
    frames = 1 + 16000 // 160  # 1 s of LMS at a 10 ms hop
    assert features.shape == (1, -(-frames // recipe.patch_size[1]), 192 * 5)

    # Both evaluations land in the demo's own results file, on the demo task generated below --out.
    scores = pd.read_csv(tmp_path / 'results' / 'scores.csv')
    baseline = tmp_path / 'runs' / f'{tag}-random_init' / 'checkpoint-0.pth'
    assert sorted(scores.weight) == sorted([str(checkpoint), str(baseline)])
    assert (scores.task == 'demo').all() and scores.score.between(0, 1).all()
    assert (tmp_path / 'demo_task' / 'metadata.csv').is_file()
    for score in scores.score:
        assert f'{100 * score:.1f}%' in printed
    assert 'pre-trained M2D' in printed and 'random weights' in printed
