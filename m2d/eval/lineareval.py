"""Linear evaluation of a checkpoint on one task: embeddings (cached) -> linear probe -> test score -> results CSV.

    from m2d.eval.lineareval import linear_evaluation
    linear_evaluation('m2d_vit_base-80x608p16x16-220930-mr7/checkpoint-300.pth', 'cremad')
    # -> {'weight': ..., 'task': 'cremad', 'metric': 'accuracy', 'score': 0.716, ...}
"""
import time
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from m2d.checkpoint import parse_size
from m2d.eval import EARLIER_KEYWORDS, renamed_keywords
from m2d.eval.embeddings import task_embeddings
from m2d.eval.linear_probe import ProbeConfig, evaluate_probe
from m2d.eval.results import DEFAULT_RESULTS, append_result
from m2d.eval.tasks import TaskData, load_task, resolve_task


def probe_task(embeddings: np.ndarray, task: TaskData, probe: ProbeConfig = ProbeConfig()) -> dict:
    """Linear-probe score of a task's embeddings [N, D]: the test score, averaged over folds for fold tasks.

    -> {'metric', 'score', 'valid', 'folds' (per-fold test scores)}.
    """
    per_fold = [evaluate_probe(embeddings, task.y, task.indices(fold, seed=probe.seed), len(task.classes),
                               task.multi_label, probe)
                for fold in range(1, task.n_folds + 1)] if task.fold is not None else \
        [evaluate_probe(embeddings, task.y, task.indices(), len(task.classes), task.multi_label, probe)]
    return dict(metric='mAP' if task.multi_label else 'accuracy',
                score=float(np.mean([r['test'] for r in per_fold])),
                valid=float(np.mean([r['valid'] for r in per_fold])),
                folds=[r['test'] for r in per_fold])


@renamed_keywords(**EARLIER_KEYWORDS)
def linear_evaluation(weight_file: Union[str, Path], task: str, evar_root: Optional[str] = None,
                      data_path: Optional[str] = None, clip_seconds: Optional[float] = None,
                      output_layers: Sequence[int] = (-1,), dataset_norm: bool = True, batch_size: int = 64,
                      seed: int = 0, results: Optional[Union[str, Path]] = DEFAULT_RESULTS,
                      probe: Optional[ProbeConfig] = None, num_workers: int = 0, device: Optional[str] = 'auto',
                      cache_dir: Optional[str] = None, pooling: str = 'mean', **runtime_settings) -> dict:
    """Evaluate `weight_file` (a checkpoint path, or 'random' with model=..., input_size=...) on `task`
    (a task name or a metadata CSV path; see resolve_task for evar_root, data_path and clip_seconds);
    append a row to `results` (None: don't) and return it, with the valid score, per-fold scores and
    whether the embeddings came from the cache.

    runtime_settings: RuntimeM2D settings such as model, input_size, patch_size, cls_token, norm_stats=[mean, std]
    (fixed LMS statistics in place of dataset_norm's or the stored ones).
    pooling: clip embedding from frame features, 'mean' (published) or 'mean+std' (embeddings.POOLINGS).
    """
    started = time.time()
    spec = resolve_task(task, evar_root, data_path, clip_seconds)
    data = load_task(spec)  # every input check happens here, before any encoding
    probe = probe or ProbeConfig(seed=seed)
    emb, cached = task_embeddings(weight_file, data, output_layers, dataset_norm, batch_size, num_workers, seed, device,
                                  cache_dir, runtime_settings, pooling)
    outcome = probe_task(emb, data, probe)
    fixed = runtime_settings.get('norm_stats')
    norm = f'norm_stats={list(fixed)}' if fixed else f'dataset_norm={dataset_norm}'
    options = f'layers={list(output_layers)} {norm} lr={probe.lr}'
    if pooling != 'mean':
        options += f' pooling={pooling}'
    label = str(weight_file)
    if label == 'random':  # one row per random architecture and seed, not one 'random' for all
        size = 'x'.join(str(v) for v in parse_size(runtime_settings['input_size']))
        label = f"random-{runtime_settings.get('model')}-{size}-seed{seed}"
    row = dict(weight=label, task=spec.name, metric=outcome['metric'], score=outcome['score'],
               seconds=round(time.time() - started, 1), mode='lineareval', options=options)
    if results is not None:
        row = append_result(results, **row)
    return {**row, 'valid': outcome['valid'], 'folds': outcome['folds'], 'cached': cached,
            'n_clips': len(data.files), 'classes': len(data.classes)}
