"""Record the published M2D pre-training trajectory on the fixed inputs of trajectory_inputs.py, for the
trajectory test: the published train_audio.py, through its own entry point (argparse, then main(args)),
trains the tiny M2D for 3 epochs on the CPU, in one process, from the fixed initial weights.

    python tests/reference/make_published_trajectory.py /path/to/published/m2d

/path/to/published/m2d is the first release of nttcslab/m2d, set up as its README describes (the code
itself is never part of this repository). Run this with an interpreter that has the published
requirements, timm 0.4.x among them (train_audio.py calls its optim_factory.add_weight_decay).

The tiny model enters through the published model registry: a factory added to the published
m2d/models_mae.py module builds the published M2DViT class with the tiny widths (its constructor draws
its usual random init, so the RNG moves as in a real run) and then loads the fixed weights.

Shims, none of which changes a number: torch._six (gone since torch 2.0) is provided with its `inf`;
numpy.float (gone since numpy 1.24) is the builtin float it aliased; torch.cuda.synchronize is a no-op
(the CPU has nothing to wait for); CUDA is hidden, so the published torch.cuda.amp.autocast() and
GradScaler() disable themselves, as they do on any machine without a GPU (fp32 throughout, no loss
scaling). One torch thread.

Writes tests/reference/published_trajectory.npz, per run (trajectory_inputs.RUNS):
  <run>/model/<key>           the final state dict (online encoder, predictor, target), float32
  <run>/exp_avg/<name>, <run>/exp_avg_sq/<name>, <run>/step/<name>
                              AdamW's state of each trainable parameter, by parameter name
  <run>/loss                  [micro-batches] the loss of each forward pass (float32)
  <run>/lr, <run>/ema_decay   [updates] the lr of each optimizer step; the EMA decay of each target update
  <run>/ids_restore           [micro-batches, B, N] the training masks (int8)
  <run>/batch_sum             [micro-batches, B] the sum of each normalised input crop (float64)
  <run>/argv                  the train_audio.py command line (data and run folders left out)
and, from the published model build with --seed 0 (the same for every run):
  init/torch_rng_state        torch's CPU RNG state right after the build (before the fixed weights load)
  init/<key>                  [sum, sum of squares] of the build's own random initial value of each key
plus versions/* (torch, timm, numpy).
"""
import json
import math
import os
import runpy
import subprocess
import sys
import tempfile
import types
from functools import partial
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import trajectory_inputs as inputs  # noqa: E402

OUT = HERE / 'published_trajectory.npz'
MODEL_NAME = 'm2d_vit_trajectory'  # the registry name of the tiny factory


def install_shims() -> None:
    import torch
    sys.modules.setdefault('torch._six', types.SimpleNamespace(inf=math.inf))
    if not hasattr(np, 'float'):
        np.float = float
    torch.cuda.synchronize = lambda device=None: None


def record_run(published: Path, run: str, work: Path) -> dict:
    """Train one run of inputs.RUNS with the published code (in this process); -> its arrays."""
    os.environ['CUDA_VISIBLE_DEVICES'] = ''  # before torch loads: the CPU behaviour of the published loop
    for name in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'SLURM_PROCID'):
        os.environ.pop(name, None)  # one process, not distributed
    import timm
    import torch
    import torch.nn as nn
    from torch.optim.optimizer import register_optimizer_step_pre_hook
    if not timm.__version__.startswith('0.4.'):
        sys.exit(f'error: the published code needs timm 0.4.x (found {timm.__version__}); '
                 'pip install timm==0.4.12 in this environment')
    torch.set_num_threads(1)
    install_shims()
    sys.path.insert(0, str(published))
    from m2d import models_mae  # the published module: train_audio.py looks its --model up here

    record = {'loss': [], 'lr': [], 'ema_decay': [], 'ids_restore': [], 'batch_sum': []}
    live = {}

    def tiny_m2d(patch_size, decoder_depth, in_chans=1, **kwargs):
        m = inputs.MODEL
        model = models_mae.M2DViT(in_chans=in_chans, patch_size=patch_size, embed_dim=m['embed_dim'],
                                  depth=m['depth'], num_heads=m['num_heads'], decoder_embed_dim=m['decoder_embed_dim'],
                                  decoder_depth=decoder_depth, decoder_num_heads=m['decoder_num_heads'],
                                  mlp_ratio=m['mlp_ratio'], norm_layer=partial(nn.LayerNorm, eps=1e-6), **kwargs)
        live['init_rng'] = torch.get_rng_state().numpy().copy()
        live['init_sums'] = {k: np.array([v.double().sum().item(), v.double().square().sum().item()])
                             for k, v in model.state_dict().items()}
        got = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
        assert got == inputs.layout(), 'the published state dict differs from trajectory_inputs.layout()'
        model.load_state_dict(inputs.initial_state_dict())
        live['model'] = model

        def before_forward(_, args):
            record['batch_sum'].append(args[0].double().sum(dim=(1, 2, 3)).numpy())

        def after_forward(_, args, output):
            loss, _, (ids_restore, _) = output
            record['loss'].append(loss.item())
            record['ids_restore'].append(ids_restore.numpy().astype(np.int8))

        model.register_forward_pre_hook(before_forward)
        model.register_forward_hook(after_forward)
        update_target = model.update_target_network

        def recorded_update(ema_decay):
            record['ema_decay'].append(ema_decay)
            update_target(ema_decay)

        model.update_target_network = recorded_update
        return model

    setattr(models_mae, MODEL_NAME, tiny_m2d)

    def before_step(optimizer, *_):
        live['optimizer'] = optimizer
        record['lr'].append(optimizer.param_groups[0]['lr'])

    register_optimizer_step_pre_hook(before_step)

    data = work / 'data'
    csv = inputs.write_dataset(data)
    out = work / 'run'
    flags = ['--model', MODEL_NAME, *inputs.COMMON_FLAGS, *inputs.RUNS[run]]
    # The published main ends by running ./all_eval.sh on the last checkpoint: here, a note instead.
    (work / 'all_eval.sh').write_text('echo "(all_eval.sh: no evaluation for the trajectory reference)"\n')
    os.chdir(work)
    sys.argv = ['train_audio.py', *flags, '--data_path', str(data), '--dataset', str(csv), '--output_dir', str(out)]
    runpy.run_path(str(published / 'train_audio.py'), run_name='__main__')

    model, optimizer = live['model'], live['optimizer']
    saved = torch.load(out / 'checkpoint-3.pth', map_location='cpu', weights_only=False)
    state = model.state_dict()
    assert all(torch.equal(saved['model'][k], v) for k, v in state.items()), 'checkpoint differs from the model'
    arrays = {f'model/{k}': v.numpy().copy() for k, v in state.items()}
    for name, p in model.named_parameters():
        if p in optimizer.state:
            s = optimizer.state[p]
            arrays[f'exp_avg/{name}'] = s['exp_avg'].numpy().copy()
            arrays[f'exp_avg_sq/{name}'] = s['exp_avg_sq'].numpy().copy()
            arrays[f'step/{name}'] = np.asarray(float(s['step']))
    arrays.update(loss=np.array(record['loss'], np.float32), lr=np.array(record['lr'], np.float64),
                  ema_decay=np.array(record['ema_decay'], np.float64),
                  ids_restore=np.stack(record['ids_restore']), batch_sum=np.stack(record['batch_sum']),
                  argv=np.array(flags))
    arrays['init/torch_rng_state'] = live['init_rng']
    arrays.update({f'init/{k}': v for k, v in live['init_sums'].items()})
    arrays.update({'versions/torch': np.array(torch.__version__), 'versions/timm': np.array(timm.__version__),
                   'versions/numpy': np.array(np.__version__)})
    return arrays


def main(published: Path) -> None:
    """Record every run in a fresh interpreter (the published code replaces print and stdout for good)."""
    refs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for run in inputs.RUNS:
            work = Path(tmp, run)
            work.mkdir()
            if subprocess.run([sys.executable, __file__, '--one', str(published), run, str(work)]).returncode:
                sys.exit(f'error: recording run {run} failed (see above); nothing written')
            with np.load(work / 'arrays.npz') as arrays:
                for key in arrays.files:
                    shared = key.startswith(('init/', 'versions/'))
                    if shared and key in refs:
                        assert np.array_equal(refs[key], arrays[key]), f'{key} differs between runs'
                    refs[key if shared else f'{run}/{key}'] = arrays[key]
    np.savez_compressed(OUT, **refs)
    summary = {run: dict(steps=len(refs[f'{run}/loss']), updates=len(refs[f'{run}/lr']),
                         first_loss=float(refs[f'{run}/loss'][0]), last_loss=float(refs[f'{run}/loss'][-1]))
               for run in inputs.RUNS}
    print(json.dumps(summary, indent=1))
    print(f'wrote {OUT} ({OUT.stat().st_size / 1e3:.0f} kB)')


if __name__ == '__main__':
    if len(sys.argv) == 5 and sys.argv[1] == '--one':
        _, _, published_dir, run_name, work_dir = sys.argv
        result = record_run(Path(published_dir).resolve(), run_name, Path(work_dir))
        np.savez(Path(work_dir) / 'arrays.npz', **result)
    elif len(sys.argv) == 2:
        main(Path(sys.argv[1]).resolve())
    else:
        sys.exit(__doc__)
