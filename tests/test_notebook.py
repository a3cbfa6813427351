"""examples/quickstart.ipynb runs top to bottom on the CPU, and the outputs saved in it are the ones it makes.

To refresh the saved outputs after editing the notebook: `python tests/test_notebook.py`.
"""
import os
import sys
import tempfile
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / 'examples' / 'quickstart.ipynb'


def execute(path: Path, cwd: Path) -> nbformat.NotebookNode:
    """Run every cell of the notebook at path in a fresh kernel started in cwd; return it with its outputs.
    cwd holds no weights, so the notebook takes its random-weight branch."""
    nb = nbformat.read(path, as_version=4)
    env = {**os.environ, 'JUPYTER_RUNTIME_DIR': str(cwd / 'jupyter'), 'IPYTHONDIR': str(cwd / 'ipython')}
    NotebookClient(nb, timeout=300, kernel_name='python3', record_timing=False,
                   resources={'metadata': {'path': str(cwd)}}).execute(env=env)
    return nb


def text(cell: nbformat.NotebookNode) -> str:
    """What a code cell printed to stdout."""
    return ''.join(o.text for o in cell.get('outputs', []) if o.output_type == 'stream' and o.name == 'stdout')


def test_quickstart_runs_and_shows_shapes_embeddings_and_a_plot(tmp_path):
    fresh = execute(NOTEBOOK, tmp_path)
    code = [c for c in fresh.cells if c.cell_type == 'code']
    printed = '\n'.join(text(c) for c in code)
    assert 'model m2d_vit_base (folder name), input_size [80, 608] (folder name)' in printed
    assert 'torch.Size([3, 48000])' in printed                                   # three 3 s clips
    assert 'torch.Size([3, 19, 3840])' in printed                                # 301 LMS frames -> 19 features
    assert 'torch.Size([3, 3840])' in printed                                    # scene embeddings
    assert 'torch.Size([3, 19, 3840]) torch.Size([3, 19])' in printed            # timestamp embeddings
    assert 'tensor([ 75., 235., 395., 555., 715.])' in printed                    # ms, every 160 ms
    assert 'tensor([[1.' in printed                                              # similarity: 1 on the diagonal
    assert any(o.output_type == 'display_data' and 'image/png' in o.data for c in code for o in c.outputs)

    saved = [c for c in nbformat.read(NOTEBOOK, as_version=4).cells if c.cell_type == 'code']
    assert all(c.outputs and c.execution_count for c in saved), 'the notebook is saved executed'
    for old, new in zip(saved, code):
        if 'shapes' in old.metadata.get('tags', []):
            assert text(old) == text(new), f'saved outputs are stale: run python {Path(__file__).name}'


if __name__ == '__main__':
    with tempfile.TemporaryDirectory() as folder:
        executed = execute(NOTEBOOK, Path(folder))
    nbformat.write(executed, NOTEBOOK)
    sys.exit(0)
