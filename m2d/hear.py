"""The HEAR API (hearbenchmark.com) for M2D checkpoints.

    import m2d.hear as module
    model = module.load_model('m2d_vit_base-80x608p16x16-220930-mr7/checkpoint-300.pth')
    scene = module.get_scene_embeddings(audio, model)            # [n, 3840]
    emb, ts = module.get_timestamp_embeddings(audio, model)      # [n, T, 3840], [n, T] in ms

Audio is float32 [n_sounds, n_samples] at 16 kHz. Each batch is normalised with its own LMS mean
and std, as RuntimeM2D.encode() does (first-release weights; later ones use the statistics they store).
"""
from typing import Any

import torch

from m2d.errors import UsageError
from m2d.runtime.runtime import RuntimeM2D

TIMESTAMP_HOP_MS = 40.0  # HEAR prefers a hop of 50 ms or less; the patch width is 160 ms


def load_model(model_file_path: str = '', **settings: Any) -> RuntimeM2D:
    """A RuntimeM2D in eval mode, with `sample_rate` (16000), `scene_embedding_size` and
    `timestamp_embedding_size` (both cfg.feature_d: 3840 for ViT-B).

    settings: any RuntimeM2D/Config setting, e.g. model='m2d_vit_base', input_size=[80, 608],
    patch_size=[16, 16] for a folder that is not named like the published ones, or
    timestamp_hop_ms (default 40; 160 encodes once, finer hops encode 160 / hop shifted copies).
    """
    weight_file = model_file_path or settings.pop('weight_file', '')
    if not weight_file:
        raise UsageError('load_model needs model_file_path: an M2D checkpoint in a folder named like '
                         'm2d_vit_base-80x608p16x16-220930-mr7/, or a name ending in "random"')
    settings.setdefault('timestamp_hop_ms', TIMESTAMP_HOP_MS)
    return RuntimeM2D(weight_file=weight_file, **settings).eval()


def get_scene_embeddings(audio: torch.Tensor, model: RuntimeM2D) -> torch.Tensor:
    """Audio [n_sounds, n_samples] at 16 kHz -> float32 embeddings [n_sounds, scene_embedding_size]."""
    return model.get_scene_embeddings(audio)


def get_timestamp_embeddings(audio: torch.Tensor, model: RuntimeM2D) -> tuple[torch.Tensor, torch.Tensor]:
    """Audio [n_sounds, n_samples] -> (float32 embeddings [n_sounds, n_frames, timestamp_embedding_size],
    timestamps [n_sounds, n_frames] in ms: a constant hop, each the centre of its embedding's patch
    width, none past the end of the audio)."""
    return model.get_timestamp_embeddings(audio)
