"""Models: checkpoint layouts, the M2D/MAE forward passes, masks, losses, the EMA update and attention."""
import math

import pytest
import torch
import torch.nn.functional as F

from m2d.model.masking import random_structured_mask, random_unstructured_mask, time_span_mask
from m2d.model.vit import MODELS, M2D_D2ViT, M2DViT, MaskedAutoencoderViT, create_model

pytestmark = pytest.mark.usefixtures('one_thread')

ENCODER_D = {'tiny': 192, 'small': 384, 'base': 768}
DECODER_D = {'mae': {'tiny': 128, 'small': 256, 'base': 512}, 'm2d': {'tiny': 128, 'small': 256, 'base': 512},
             'm2d_d2v': {'tiny': 128, 'small': 256, 'base': 512}, 'msm_mae': {'tiny': 96, 'small': 192, 'base': 384}}


def _vit_block_layout(prefix: str, depth: int, d: int) -> list[tuple[str, list[int]]]:
    keys = []
    for i in range(depth):
        p = f'{prefix}.{i}.'
        keys += [(p + 'norm1.weight', [d]), (p + 'norm1.bias', [d]),
                 (p + 'attn.qkv.weight', [3 * d, d]), (p + 'attn.qkv.bias', [3 * d]),
                 (p + 'attn.proj.weight', [d, d]), (p + 'attn.proj.bias', [d]),
                 (p + 'norm2.weight', [d]), (p + 'norm2.bias', [d]),
                 (p + 'mlp.fc1.weight', [4 * d, d]), (p + 'mlp.fc1.bias', [4 * d]),
                 (p + 'mlp.fc2.weight', [d, 4 * d]), (p + 'mlp.fc2.bias', [d])]
    return keys


def published_layout(family: str, size: str, n_tokens: int, depth: int = 12) -> list[tuple[str, list[int]]]:
    """Key names and shapes in the published checkpoints' order (M2D ViT-B 80x608 as the template)."""
    d, dd = ENCODER_D[size], DECODER_D[family][size]
    dec_depth = 4 if family == 'msm_mae' else 8
    pred = d if family.startswith('m2d') else 16 * 16
    keys = [('cls_token', [1, 1, d]), ('pos_embed', [1, 1 + n_tokens, d]), ('mask_token', [1, 1, dd]),
            ('decoder_pos_embed', [1, 1 + n_tokens, dd]),
            ('patch_embed.proj.weight', [d, 1, 16, 16]), ('patch_embed.proj.bias', [d])]
    keys += _vit_block_layout('blocks', depth, d) + [('norm.weight', [d]), ('norm.bias', [d])]
    keys += [('decoder_embed.weight', [dd, d]), ('decoder_embed.bias', [dd])]
    keys += _vit_block_layout('decoder_blocks', dec_depth, dd)
    keys += [('decoder_norm.weight', [dd]), ('decoder_norm.bias', [dd]),
             ('decoder_pred.weight', [pred, dd]), ('decoder_pred.bias', [pred])]
    if family.startswith('m2d'):
        keys += _vit_block_layout('target_blocks', depth, d) + [('target_norm.weight', [d]), ('target_norm.bias', [d])]
    return keys


def test_published_template_has_400_entries():
    # The published M2D ViT-B 80x608 checkpoint holds 400 entries; the template must agree.
    assert len(published_layout('m2d', 'base', 190)) == 400


@pytest.mark.parametrize('family', ['m2d', 'm2d_d2v', 'msm_mae', 'mae'])
@pytest.mark.parametrize('size', ['tiny', 'small', 'base'])
def test_state_dict_layout(family, size):
    with torch.device('meta'):  # names and shapes only: no memory, no init cost
        model = create_model(f'{family}_vit_{size}', img_size=[80, 608], patch_size=[16, 16])
    got = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    assert got == published_layout(family, size, 5 * 38)


def test_encoder_only_layout_has_no_pretraining_parts():
    with torch.device('meta'):
        model = create_model('m2d_vit_base', img_size=[80, 608], encoder_only=True)
    assert list(model.state_dict()) == [k for k, _ in published_layout('m2d', 'base', 190)
                                        if not k.startswith(('mask_token', 'decoder', 'target'))]


def test_create_model_unknown_name():
    with pytest.raises(ValueError) as e:
        create_model('m2d_vit_large')
    assert "unknown model 'm2d_vit_large'" in str(e.value) and 'm2d_vit_base' in str(e.value)
    assert len(MODELS) == 12


def tiny(name: str = 'm2d_vit_tiny', seed: int = 0, **kwargs) -> MaskedAutoencoderViT:
    torch.manual_seed(seed)
    decoder_depth = 4 if name.startswith('msm_mae') else 2  # MSM-MAE's decoder depth is fixed
    return create_model(name, img_size=[80, 208], depth=2, decoder_depth=decoder_depth, **kwargs).eval()


def imgs(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 1, 80, 208, generator=torch.Generator().manual_seed(seed))


def given_mask(batch: int = 2, n: int = 65, ratio: float = 0.7, seed: int = 2) -> tuple[torch.Tensor, int]:
    ids_shuffle = torch.rand(batch, n, generator=torch.Generator().manual_seed(seed)).argsort(dim=1)
    return ids_shuffle.argsort(dim=1), int(n * (1 - ratio))


def test_position_tables_and_init():
    model = tiny()
    pos = model.pos_embed[0]
    assert not model.pos_embed.requires_grad and torch.equal(pos[0], torch.zeros(192))
    # Token f * 13 + t: first half of the dims encodes t, the second half f (sin then cos).
    f, t = 3, 7
    assert math.isclose(pos[1 + f * 13 + t, 0].item(), math.sin(t), abs_tol=1e-6)
    assert math.isclose(pos[1 + f * 13 + t, 96].item(), math.sin(f), abs_tol=1e-6)
    assert math.isclose(pos[1 + f * 13 + t, 48].item(), math.cos(t), abs_tol=1e-6)
    assert torch.equal(model.blocks[0].attn.qkv.bias, torch.zeros(576))
    assert 0.01 < model.cls_token.std().item() < 0.03
    # The target network has its own init; it is not a copy of the online encoder.
    assert not torch.equal(model.blocks[0].attn.qkv.weight, model.target_blocks[0].attn.qkv.weight)


def test_m2d_forward_with_ratio_and_with_given_mask():
    model, x = tiny(), imgs()
    loss, pred, (ids_restore, mask) = model(x, 0.7)
    assert loss.ndim == 0 and pred.shape == (2, 65 - 19, 192) and mask.shape == (2, 65)
    assert (mask.sum(1) == 46).all()
    ids_restore, len_keep = given_mask()
    loss1, pred1, (restore1, mask1) = model(x, (ids_restore, len_keep))
    loss2, pred2, _ = model(x, (ids_restore, len_keep))
    assert torch.equal(loss1, loss2) and torch.equal(pred1, pred2) and torch.equal(restore1, ids_restore)
    ids_shuffle = ids_restore.argsort(dim=1)
    expected_mask = torch.ones(2, 65)
    expected_mask.scatter_(1, ids_shuffle[:, :len_keep], 0.0)
    assert torch.equal(mask1, expected_mask)
    with pytest.raises(ValueError, match='mask_ratio must be > 0'):
        model(x, 0.0)


def _masked_target(model: M2DViT, x: torch.Tensor, ids_restore: torch.Tensor, len_keep: int, all_tokens: bool):
    """Spec section 4 step 4, written out: the target encoder on the masked tokens of the shared embedding."""
    tokens = model.patch_embed(x) + model.pos_embed[:, 1:]
    ids_masked = ids_restore.argsort(dim=1)[:, len_keep:]
    cls = (model.cls_token + model.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
    seq = tokens if all_tokens else torch.gather(tokens, 1, ids_masked[..., None].expand(-1, -1, 192))
    h = torch.cat([cls, seq], dim=1)
    for blk in model.target_blocks:
        h = blk(h)
    h = model.target_norm(h)[:, 1:]
    return torch.gather(h, 1, ids_masked[..., None].expand(-1, -1, 192)) if all_tokens else h


@pytest.mark.parametrize('name', ['m2d_vit_tiny', 'm2d_d2v_vit_tiny'])
@pytest.mark.parametrize('loss_type', ['norm_mse', 'mse'])
@pytest.mark.parametrize('norm_pix_loss', [True, False])
def test_m2d_losses(name, loss_type, norm_pix_loss):
    model, x = tiny(name, loss_type=loss_type, norm_pix_loss=norm_pix_loss), imgs()
    ids_restore, len_keep = given_mask()
    with torch.no_grad():
        loss, pred, _ = model(x, (ids_restore, len_keep))
        target = _masked_target(model, x, ids_restore, len_keep, all_tokens=isinstance(model, M2D_D2ViT))
    if norm_pix_loss:
        std = torch.sqrt(target.var(-1, unbiased=True, keepdim=True) + 1e-6)
        target = (target - target.mean(-1, keepdim=True)) / std
    if loss_type == 'norm_mse':
        expected = (2 - 2 * F.cosine_similarity(pred, target, dim=-1, eps=1e-12)).mean()
    else:
        expected = ((pred - target) ** 2).mean()
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)


def test_unknown_loss_type():
    with pytest.raises(ValueError, match="'norm_mse' or 'mse'"):
        tiny(loss_type='l1')


@pytest.mark.parametrize('name', ['msm_mae_vit_tiny', 'mae_vit_tiny'])
@pytest.mark.parametrize('norm_pix_loss', [True, False])
def test_mae_forward_and_pixel_loss(name, norm_pix_loss):
    model, x = tiny(name, norm_pix_loss=norm_pix_loss), imgs()
    ids_restore, len_keep = given_mask(ratio=0.75)
    with torch.no_grad():
        loss, pred, mask = model(x, (ids_restore, len_keep))
    assert pred.shape == (2, 65, 256) and (mask.sum(1) == 65 - len_keep).all()
    # Patchify order (f, t, p_f, p_t): token f * 13 + t holds imgs[f*16:(f+1)*16, t*16:(t+1)*16].
    target = model.patchify(x)
    assert torch.equal(target[1, 2 * 13 + 5], x[1, 0, 32:48, 80:96].flatten())
    assert torch.equal(model.unpatchify(target), x)
    if norm_pix_loss:
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    per_patch = ((pred - target) ** 2).mean(-1)
    torch.testing.assert_close(loss, (per_patch * mask).sum() / mask.sum())
    _, float_pred, float_mask = model(x, 0.75)
    assert (float_mask.sum(1) == 65 - int(65 * 0.25)).all()


def _is_permutation(ids: torch.Tensor) -> bool:
    return torch.equal(ids.sort(dim=1).values, torch.arange(ids.shape[1]).expand_as(ids))


def _masked_grid(ids_shuffle: torch.Tensor, len_keep: int, grid_size: tuple[int, int]) -> torch.Tensor:
    """The mask [B, F', T'] (True = masked) that ids_shuffle and len_keep describe."""
    masked = torch.ones(ids_shuffle.shape, dtype=torch.bool)
    masked.scatter_(1, ids_shuffle[:, :len_keep], False)
    return masked.reshape(-1, *grid_size)


@pytest.mark.parametrize('ratio', [0.5, 0.6, 0.7, 0.75])
def test_random_unstructured_mask(ratio):
    ids_shuffle, len_keep = random_unstructured_mask(4, (5, 38), ratio)
    assert ids_shuffle.shape == (4, 190) and ids_shuffle.dtype == torch.int64
    assert len_keep == int(190 * (1 - ratio)) and _is_permutation(ids_shuffle)
    assert not torch.equal(ids_shuffle[0], ids_shuffle[1])


def test_random_unstructured_mask_publication_numbers():
    assert random_unstructured_mask(1, (5, 38), 0.7)[1] == 57


@pytest.mark.parametrize('ratio', [0.3, 0.5, 0.7])
def test_random_structured_mask(ratio):
    torch.manual_seed(0)
    fractions = []
    for _ in range(30):
        ids_shuffle, len_keep = random_structured_mask(3, (5, 13), ratio)
        assert _is_permutation(ids_shuffle) and 0 < len_keep < 65
        grid = _masked_grid(ids_shuffle, len_keep, (5, 13))
        rows, cols = grid.all(dim=2), grid.all(dim=1)
        # Only whole rows and whole columns are masked; never every row.
        assert torch.equal(grid, rows[:, :, None] | cols[:, None, :]) and not rows.all(dim=1).any()
        # Visible tokens come first, in grid order.
        assert (ids_shuffle[:, :len_keep].diff(dim=1) > 0).all()
        fractions.append(1 - len_keep / 65)
    assert abs(sum(fractions) / len(fractions) - ratio) < 0.15


@pytest.mark.parametrize('ratio,span', [(0.5, 1), (0.5, 3), (0.6, 4), (0.3, 5)])
def test_time_span_mask(ratio, span):
    torch.manual_seed(0)
    grid_f, grid_t = 5, 16
    n_cols = round(grid_t * ratio)
    ids_shuffle, len_keep = time_span_mask(64, (grid_f, grid_t), ratio, span=span)
    assert _is_permutation(ids_shuffle) and len_keep == grid_f * (grid_t - n_cols)
    grid = _masked_grid(ids_shuffle, len_keep, (grid_f, grid_t))
    cols = grid[:, 0]
    # Whole time columns, the same count in every sample, and visible tokens first in grid order.
    assert torch.equal(grid, cols[:, None, :].expand_as(grid)) and (cols.sum(1) == n_cols).all()
    assert (ids_shuffle[:, :len_keep].diff(dim=1) > 0).all()
    # Runs of `span` columns (two cut by the crop's edges, one cut short to hit the count) make few
    # masked stretches; and where they fall differs between samples.
    stretches = (cols[:, 1:] & ~cols[:, :-1]).sum(1) + cols[:, 0]
    assert (stretches <= -(-n_cols // span) + 2).all()
    assert len({tuple(row) for row in cols.tolist()}) > 10


def test_time_span_mask_share_mixes_span_and_unstructured_samples():
    torch.manual_seed(0)
    ids_shuffle, len_keep = time_span_mask(400, (5, 16), 0.5, span=4, share=0.25)
    assert _is_permutation(ids_shuffle) and len_keep == 40
    grid = _masked_grid(ids_shuffle, len_keep, (5, 16))
    whole_columns = (grid == grid[:, :1]).flatten(1).all(1)
    assert (grid.flatten(1).sum(1) == 40).all() and 0.18 < whole_columns.float().mean() < 0.32


def test_structured_mask_in_the_model():
    model = tiny()
    model.set_random_structured_mask()
    latent, mask, ids_restore = model.forward_encoder(imgs(3), 0.5)
    assert latent.shape[1] - 1 == int((mask[0] == 0).sum()) and (mask.sum(1) == mask[0].sum()).all()
    assert _is_permutation(ids_restore)


def test_forward_encoder_without_mask_and_layers():
    model, x = tiny(), imgs()
    with torch.no_grad():
        latent, mask, ids_restore = model.forward_encoder(x, 0.0)
        layers, *_ = model.forward_encoder(x, 0.0, return_layers=True)
    assert latent.shape == (2, 66, 192) and not mask.any() and torch.equal(ids_restore[0], torch.arange(65))
    assert len(layers) == 2 and torch.equal(layers[-1], latent)
    with pytest.raises(ValueError, match=r'takes input \[B, 1, 80, 208\]'):
        model.forward_encoder(torch.zeros(2, 1, 80, 200))


def test_update_target_network_is_an_exact_ema():
    model = tiny()
    online, target = model.ema_pairs()
    assert len(online) == len(target) == 2 * 12 + 2
    before = [t.clone() for t in target]
    decay = 0.99995
    model.update_target_network(decay)
    for t, t0, o in zip(target, before, online):
        expected = decay * t0 + (1 - decay) * o
        torch.testing.assert_close(t, expected, atol=1e-7, rtol=1e-6)
        assert not t.requires_grad
    model.update_target_network(0.0)
    assert all(torch.equal(t, o) for t, o in zip(target, online))


def test_sdpa_attention_equals_naive_softmax_attention():
    model, x = tiny(), torch.randn(2, 66, 192, generator=torch.Generator().manual_seed(5))
    attn = model.blocks[0].attn
    assert attn.fused_attn  # the block uses F.scaled_dot_product_attention
    with torch.no_grad():
        got = attn(x)
        B, N, C = x.shape
        heads = attn.num_heads
        q, k, v = (attn.qkv(x).reshape(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4))
        weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(C // heads), dim=-1)
        expected = attn.proj((weights @ v).transpose(1, 2).reshape(B, N, C))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_gradients_reach_the_online_network_only():
    model = tiny().train()
    loss, *_ = model(imgs(), 0.7)
    loss.backward()
    assert model.blocks[0].attn.qkv.weight.grad is not None and model.decoder_pred.weight.grad is not None
    assert model.patch_embed.proj.weight.grad is not None
    assert all(p.grad is None for p in model.target_blocks.parameters())
