"""--fast: what it turns on (and nothing else), and that a run with it trains."""
import math

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_pretrain import run, tiny_argv
from timm.models.vision_transformer import Block

from m2d.checkpoint import load_checkpoint
from m2d.model.vit import create_model
from m2d.train.config import TrainConfig, get_args_parser
from m2d.train.fast import apply_fast, compile_blocks


def resolved(argv: list[str], device: str) -> dict:
    return vars(apply_fast(TrainConfig(**vars(get_args_parser().parse_args(argv))), torch.device(device)))


def test_fast_sets_bf16_and_on_cuda_compile_only():
    published = resolved([], 'cuda')
    assert published == vars(get_args_parser().parse_args([]))  # without --fast nothing changes
    for device, expected in (('cpu', {'amp': 'bf16'}), ('cuda', {'amp': 'bf16', 'compile': True})):
        fast = resolved(['--fast'], device)
        assert {k: v for k, v in fast.items() if published[k] != v} == {'fast': True, **expected}
    assert resolved(['--fast', '--amp', 'fp16'], 'cuda')['amp'] == 'fp16'  # a given --amp wins
    assert resolved(['--fast', '--amp', 'none'], 'cpu')['amp'] == 'none'


def step_losses(run_dir) -> list[float]:
    events = EventAccumulator(str(run_dir))
    events.Reload()
    return [e.value for e in events.Scalars('train_loss')]


def test_a_fast_run_trains_and_differs_only_in_precision(lms_data, tmp_path, capsys, one_thread):
    flags = ['--epochs', '4', '--blr', '1e-2', '--save_freq', '4']
    fast = run(tiny_argv(lms_data, tmp_path / 'fast', *flags, '--fast')).output_dir
    console = capsys.readouterr().out
    assert '--fast on cpu: bf16 autocast, no torch.compile on the CPU' in console
    assert 'precision torch.bfloat16' in console
    losses = step_losses(fast)
    assert len(losses) == 8 and all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3

    plain = run(tiny_argv(lms_data, tmp_path / 'plain', *flags)).output_dir
    stored = [vars(load_checkpoint(folder / 'checkpoint-4.pth')['args']) for folder in (fast, plain)]
    differ = {k for k in stored[0].keys() | stored[1].keys() if stored[0].get(k) != stored[1].get(k)}
    assert differ == {'fast', 'amp', 'output_dir'}
    assert (stored[0]['amp'], stored[1]['amp']) == ('bf16', None)


def test_compile_compiles_each_block_in_place_and_keeps_the_state_dict():
    model = create_model('m2d_vit_tiny', img_size=[80, 96], depth=2, decoder_depth=1)
    keys = list(model.state_dict())
    assert compile_blocks(model) is model
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    assert len(blocks) == 2 + 1 + 2  # encoder, predictor, target
    assert all(b._compiled_call_impl is not None for b in blocks)  # what nn.Module.compile() sets
    assert list(model.state_dict()) == keys  # checkpoints load into eager models as they are
