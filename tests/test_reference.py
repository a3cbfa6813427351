"""Faithfulness: our outputs against outputs recorded from the published M2D implementation.

tests/golden/m2d_reference.npz holds what the published code computed from fixed inputs: a
checkpoint with the published key layout (tests/golden/layouts.json) and seeded values, seeded
audio, LMS, a training batch and a training mask. The inputs are regenerated here exactly (NumPy
PCG64 draws in the recorded order), so a clean clone checks itself; the comparisons and
tolerances are those of the project's shared golden check.
"""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from m2d.model.vit import m2d_vit_base
from m2d.runtime.runtime import RuntimeM2D

sys.path.insert(0, str(Path(__file__).parent / 'reference'))
from seeded_weights import seeded_state_dict  # noqa: E402

GOLDEN = Path(__file__).parent / 'golden'
TOL = {'lms': 2e-3, 'encode': 2e-3, 'scene': 1e-3, 'layers_last': 2e-3, 'train_loss': 2e-5, 'train_pred': 1e-3}
ENCODER_KEYS = ('cls_token', 'pos_embed', 'patch_embed.', 'blocks.', 'norm.')


# ----- the recorded inputs ----------------------------------------------------------------------

def published_state_dict(layout: list, seed: int, keys=None) -> dict[str, torch.Tensor]:
    """The recorded checkpoint's values (seeded_weights.py; the 80x608 crop has 5 frequency rows)."""
    return seeded_state_dict(layout, seed, grid_f=5, keys=keys)


def golden_audio() -> np.ndarray:
    """Three 10 s clips of uniform noise at 16 kHz: [3, 160000]."""
    return np.random.default_rng(10).uniform(-1, 1, (3, 10 * 16000)).astype(np.float32)


def golden_lms() -> np.ndarray:
    """[2, 1, 80, 900] standard normal."""
    return np.random.default_rng(11).standard_normal((2, 1, 80, 900)).astype(np.float32)


def golden_train_batch() -> np.ndarray:
    """[2, 1, 80, 608] standard normal."""
    return np.random.default_rng(12).standard_normal((2, 1, 80, 608)).astype(np.float32)


def golden_train_mask(batch: int = 2, length: int = 190, ratio: float = 0.7) -> tuple[np.ndarray, int]:
    """(ids_restore [B, N] int64, len_keep): tokens sorted by uniform noise, the first len_keep visible."""
    noise = np.random.default_rng(13).random((batch, length))
    ids_restore = np.argsort(np.argsort(noise, axis=1, kind='stable'), axis=1, kind='stable')
    return ids_restore.astype(np.int64), int(length * (1 - ratio))


# ----- the checks -------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def reference():
    return np.load(GOLDEN / 'm2d_reference.npz')


@pytest.fixture(scope='module')
def layout():
    return json.loads((GOLDEN / 'layouts.json').read_text())['m2d_vit_base-80x608p16x16']


def assert_matches(name: str, got, want, tol: float) -> None:
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f'{name}: shape {got.shape} != reference {want.shape}'
    diff = np.abs(got - want).max()
    assert diff <= tol, f'{name}: max abs diff {diff:.2e} > tolerance {tol:.0e}'


@torch.no_grad()
def test_runtime_matches_published(tmp_path, reference, layout):
    # Encoder weights only (the runtime then loads encoder-only): the published values of those keys.
    path = tmp_path / 'm2d_vit_base-80x608p16x16-220930-mr7' / 'checkpoint-300.pth'
    path.parent.mkdir()
    torch.save({'model': published_state_dict(layout, seed=1, keys=ENCODER_KEYS)}, path)
    rt = RuntimeM2D(weight_file=str(path)).eval()
    audio = torch.from_numpy(golden_audio())
    assert_matches('lms', rt.to_feature(audio), reference['m2d_lms'], TOL['lms'])
    assert_matches('encode', rt.encode(audio), reference['m2d_encode'], TOL['encode'])
    assert_matches('scene', rt.get_scene_embeddings(audio), reference['m2d_scene'], TOL['scene'])
    layers = rt.encode_lms(torch.from_numpy(golden_lms()), return_layers=True)
    assert len(layers) == 12
    assert_matches('layers_last', np.asarray(layers[-1])[..., ::7], reference['m2d_layers_last'], TOL['layers_last'])


@torch.no_grad()
def test_training_forward_matches_published(reference, layout):
    state = published_state_dict(layout, seed=3)
    ids_restore, len_keep = golden_train_mask()
    mask = (torch.from_numpy(ids_restore), len_keep)
    for npl in (1, 0):
        model = m2d_vit_base(img_size=[80, 608], patch_size=[16, 16], decoder_depth=8,
                             norm_pix_loss=bool(npl), loss_type='norm_mse')
        model.load_state_dict(state)
        loss, pred, *_ = model.eval()(torch.from_numpy(golden_train_batch()), mask_ratio=mask)
        assert_matches(f'train_loss_npl{npl}', float(loss), reference[f'train_loss_npl{npl}'], TOL['train_loss'])
        if npl:
            assert_matches('train_pred', np.asarray(pred)[..., ::7], reference['train_pred_npl1'], TOL['train_pred'])
