"""The M2D family's later weight formats: RuntimeM2D equals the later runtime (portable_m2d.py) on the same
weights and audio. The weights are rebuilt from seeds (tests/portable_layouts.py); the references were
recorded by tests/reference/make_portable_refs.py."""
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_checkpoint
from einops import rearrange
from portable_layouts import LAYOUTS, SUBSAMPLE

from m2d.runtime.runtime import RuntimeM2D

pytestmark = pytest.mark.usefixtures('one_thread')
REFS = np.load(Path(__file__).parent / 'reference' / 'portable_m2d_refs.npz')
TOL = dict(atol=2e-4, rtol=1e-3)


@pytest.fixture(scope='module')
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp('released')
    return {layout.name: (layout, layout.save(root)) for layout in LAYOUTS}


def outputs(runtime: RuntimeM2D, layout) -> dict[str, torch.Tensor]:
    audio = layout.audio()
    with torch.inference_mode():
        out = {'encode': lambda: runtime.encode(audio)[..., ::SUBSAMPLE],
               'logits': lambda: runtime(audio)[..., ::SUBSAMPLE],
               'clap_audio': lambda: runtime.encode_clap_audio(audio)}
        return {name: out[name]() for name in layout.outputs}


@pytest.mark.parametrize('name', [layout.name for layout in LAYOUTS])
def test_equals_the_later_runtime(saved, name):
    layout, path = saved[name]
    runtime = RuntimeM2D(weight_file=str(path), **layout.runtime)
    for output, value in outputs(runtime, layout).items():
        want = torch.from_numpy(REFS[f'{name}/{output}'])
        assert value.shape == want.shape, output
        torch.testing.assert_close(value, want, **TOL, msg=f'{name}/{output}')
    check = CHECKS.get(name)
    if check:
        check(runtime, path)


def first_release(runtime, path):
    # Given stats, it runs as the later runtime; by itself it keeps the first release's conventions.
    assert runtime.cfg.last_chunk == 'trim' and runtime.spec.sources['model'] == 'checkpoint'
    assert len(runtime.backbone.decoder_blocks) == 2 and not runtime.backbone.encoder_only
    published = RuntimeM2D(weight_file=str(path), encoder_only=True)
    assert (published.cfg.mean, published.cfg.std, published.cfg.last_chunk) == (None, None, 'pad')


def later_p16k(runtime, path):
    cfg = runtime.cfg
    assert (cfg.sr, cfg.last_chunk) == ('16k', 'trim') and (cfg.mean, cfg.std) == pytest.approx((-7.25, 4.35))
    lms = torch.randn(1, 1, 80, 301)
    whole, rest = runtime.encode_lms(lms[..., :208]), runtime.encode_lms(lms[..., 208:])
    torch.testing.assert_close(runtime.encode_lms(lms), torch.cat([whole, rest], dim=1))  # the tail alone


def as_p32k_enconly(runtime, path):
    cfg = runtime.cfg
    assert (cfg.sr, cfg.sample_rate, cfg.n_fft, cfg.hop_size, cfg.f_max) == ('32k', 32000, 800, 320, 16000)
    assert runtime.backbone.encoder_only and runtime.cfg.model == 'm2d_as_vit_base'


def frames_40ms(runtime, path):
    assert runtime.cfg.patch_size == [16, 4] and runtime.encode(torch.zeros(1, 40000).uniform_(-1, 1)).shape[1] == 63


def as_with_heads(runtime, path):
    assert runtime.spec.extra_parts == ['offline_predictor'] and runtime.spec.norm_stats == pytest.approx((-7.2, 4.3))


def evar_finetuned(runtime, path):
    assert runtime.cfg.feature_d == 3840 and not runtime.cfg.flat_features
    assert set(runtime.spec.extra_parts) == {'head'}
    plain = RuntimeM2D(weight_file=str(path))  # no num_classes: frame features, the head left unused
    assert not hasattr(plain, 'head') and plain(torch.zeros(1, 16000).uniform_(-1, 1)).shape == (1, 7, 3840)


def clap(runtime, path):
    audio = torch.zeros(1, 24000).uniform_(-1, 1)
    tokens = runtime.encode(audio)
    frames = rearrange(tokens, 'b (f t) d -> b t (f d)', f=runtime.grid_f)  # one chunk: frame layout
    torch.testing.assert_close(runtime.project_audio(frames), runtime.project_audio(tokens), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match='text_encoder= to a local folder'):
        runtime.encode_clap_text(['a dog barks'])


def clap_semantic(runtime, path):
    clap(runtime, path)
    assert set(runtime.spec.extra_parts) == {'audio_proj', 'text_proj', 'text_encoder'}
    assert runtime.spec.name_extra == ['B', 'TI'] and isinstance(runtime.text_proj, torch.nn.Sequential)


CHECKS = {'first_release': first_release, 'later_p16k': later_p16k, 'as_p32k_enconly': as_p32k_enconly,
          'frames_40ms': frames_40ms, 'as_with_heads': as_with_heads, 'evar_finetuned': evar_finetuned,
          'clap_mlp': clap, 'clap_semantic': clap_semantic}


# ----- the later runtime's keywords, on a tiny model ------------------------------------------------

def test_dur_frames_encodes_in_one_piece(tiny_ckpt):
    from timm.layers import resample_abs_pos_embed
    lms = torch.randn(2, 1, 80, 400)
    base = RuntimeM2D(weight_file=str(tiny_ckpt), last_chunk='trim')
    short = RuntimeM2D(weight_file=str(tiny_ckpt), dur_frames=96)
    assert short.cfg.input_size == [80, 96] and short.backbone.encoder_only and short.cfg.last_chunk == 'trim'
    torch.testing.assert_close(short.encode_lms(lms[..., :90]), base.encode_lms(lms[..., :90]))  # first 6 columns
    long = RuntimeM2D(weight_file=str(tiny_ckpt), dur_frames=400)
    expected = resample_abs_pos_embed(base.backbone.pos_embed, [5, 25], [5, 13], antialias=False)
    torch.testing.assert_close(long.backbone.pos_embed, expected)
    assert long.encode_lms(lms).shape == (2, 25, 960)


def test_task_head_freeze_embed_and_evar_style_cfg(tiny_ckpt):
    cfg = {'weight_file': str(tiny_ckpt), 'num_classes': 3, 'freeze_embed': True, 'output_layers': [-1, 0],
           'mean': -5.0, 'std': 3.0}
    runtime = RuntimeM2D(cfg=cfg)
    audio = torch.zeros(2, 16000).uniform_(-1, 1)
    logits = runtime.train()(audio)
    assert logits.shape == (2, 3) and logits.requires_grad
    assert not any(p.requires_grad for p in runtime.backbone.patch_embed.parameters())
    assert runtime.backbone.blocks[0].attn.qkv.weight.requires_grad
    runtime.eval()
    frames = runtime.encode(audio)
    torch.testing.assert_close(runtime(audio), runtime.head(frames.mean(1)))
    torch.testing.assert_close(frames, runtime.encode_lms((runtime.to_feature(audio) + 5.0) / 3.0))
    # The caller's extra keys stay readable; the settled settings are written back into its config.
    assert runtime.cfg.output_layers == [-1, 0] and runtime.cfg.get('missing', 'x') == 'x'
    assert cfg['feature_d'] == 960 and cfg['model'] == 'm2d_vit_tiny' and cfg['input_size'] == [80, 208]
    assert (cfg['mean'], cfg['std'], runtime.cfg.last_chunk) == (-5.0, 3.0, 'trim')


def with_stored_stats(checkpoint: Path, folder: Path, stats: tuple[float, float]) -> Path:
    """A copy of a checkpoint that stores norm_stats, in a later-format (p16k) folder."""
    ckpt = torch.load(checkpoint)
    ckpt['model']['norm_stats'] = torch.tensor(stats)
    path = folder / 'm2d_vit_tiny-80x208p16x16p16k-240101' / 'checkpoint-1.pth'
    path.parent.mkdir()
    torch.save(ckpt, path)
    return path


def test_evaluator_uses_stored_stats(tiny_ckpt, tmp_path):
    from m2d.audio.synth import write_labelled_task
    from m2d.eval.embeddings import clip_loader, task_embeddings
    from m2d.eval.tasks import load_task, resolve_task
    path = with_stored_stats(tiny_ckpt, tmp_path, (-6.0, 3.0))
    task = load_task(resolve_task(str(write_labelled_task(tmp_path / 'task', n_per_class=(2, 1, 1), seconds=0.5))))
    emb, _ = task_embeddings(path, task, dataset_norm=True, batch_size=4, cache_dir='')
    runtime = RuntimeM2D(weight_file=str(path))
    audio = next(iter(clip_loader(task.files[:4], 0.5, 4, sample_rate=16000)))
    expected = runtime.encode_lms((runtime.to_feature(audio) + 6.0) / 3.0).mean(1)
    torch.testing.assert_close(torch.from_numpy(emb[:4]), expected, atol=1e-5, rtol=1e-4)


def test_a_model_width_that_is_no_multiple_of_the_patch_width(tmp_path):
    # Like the 80x1001 weights: a full chunk loses its last 9 frames, and no chunk is ever wider than the model.
    path = make_checkpoint(tmp_path, input_size=(80, 100))
    pad, trim = RuntimeM2D(weight_file=str(path)), RuntimeM2D(weight_file=str(path), last_chunk='trim')
    lms = torch.randn(1, 1, 80, 150)
    torch.testing.assert_close(trim.encode_lms(lms[..., :99]), pad.encode_lms(lms[..., :99]))  # 99 -> 100 -> 6 patches
    frames = trim.encode_lms(lms)  # 100 frames (6 patches), then 50 -> 64 frames (4 patches)
    assert frames.shape == (1, 10, 960)
    torch.testing.assert_close(frames[:, 6:], trim.encode_lms(lms[..., 100:]))


def test_unused_heads_are_reported_and_unknown_keys_fail(tiny_ckpt, tmp_path, caplog):
    ckpt = torch.load(tiny_ckpt)
    ckpt['model'].update({'offline_predictor.weight': torch.zeros(7, 960), 'offline_predictor.bias': torch.zeros(7)})
    path = tmp_path / tiny_ckpt.parent.name / 'checkpoint-1.pth'
    path.parent.mkdir()
    torch.save(ckpt, path)
    runtime = RuntimeM2D(weight_file=str(path))
    assert runtime.spec.extra_parts == ['offline_predictor']
    assert ('offline_predictor (the M2D-X/AS/S offline-target predictor (pre-training only)); not used here'
            in caplog.text)
    ckpt['model']['mystery.weight'] = torch.zeros(3)
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match=r'unexpected keys \(1\): mystery.weight'):
        RuntimeM2D(weight_file=str(path))


def test_encode_files_with_stored_stats_does_not_depend_on_batching(tiny_ckpt, tmp_path):
    import soundfile as sf

    from m2d.tools.encode import encode_files
    path = with_stored_stats(tiny_ckpt, tmp_path, (-6.0, 3.0))
    (tmp_path / 'wav').mkdir()
    rng = np.random.default_rng(0)
    for i, seconds in enumerate((1.0, 2.3, 2.3, 3.7)):  # last chunks of different lengths are encoded apart
        sf.write(tmp_path / 'wav' / f'{i}.wav', rng.uniform(-0.5, 0.5, int(seconds * 16000)).astype(np.float32), 16000)
    for batch_size in (1, 4):
        encode_files(path, tmp_path / 'wav', tmp_path / f'out{batch_size}', frames=True, batch_size=batch_size,
                     device='cpu', progress=False)
    runtime = RuntimeM2D(weight_file=str(path))
    for i in range(4):
        one, four = (np.load(tmp_path / f'out{b}' / f'{i}.npy') for b in (1, 4))
        np.testing.assert_allclose(four, one, atol=1e-5, rtol=1e-4)
        audio = torch.from_numpy(sf.read(tmp_path / 'wav' / f'{i}.wav', dtype='float32')[0])[None]
        np.testing.assert_allclose(one, runtime.encode(audio)[0].numpy(), atol=1e-5, rtol=1e-4)


def write_32k_task(root: Path, high_tone: bool) -> Path:
    """A task of 8 clips (0.5 s, 32 kHz files) of low tones (200-3000 Hz), with a 12 kHz tone added when
    high_tone: audio at 16 kHz cannot hold it. -> the metadata CSV."""
    import soundfile as sf
    rng = np.random.default_rng(0)
    t = np.arange(16000) / 32000
    (root / 'audio').mkdir(parents=True)
    for i in range(8):
        wav = sum(0.2 * np.sin(2 * np.pi * f * t + p) for f, p in zip(rng.uniform(200, 3000, 3), rng.uniform(0, 6, 3)))
        wav = wav + (0.2 * np.sin(2 * np.pi * 12000 * t) if high_tone else 0)
        sf.write(root / 'audio' / f'{i}.wav', wav.astype(np.float32), 32000, subtype='FLOAT')
    splits = ['train'] * 4 + ['valid'] * 2 + ['test'] * 2
    rows = [f'{i}.wav,{"ab"[i % 2]},{split}' for i, split in enumerate(splits)]
    (root / 'metadata.csv').write_text('file_name,label,split\n' + '\n'.join(rows) + '\n')
    return root / 'metadata.csv'


def test_evaluator_gives_32k_weights_32k_audio(tiny_ckpt, tmp_path, monkeypatch):
    """p32k weights get the task's audio at 32 kHz, in linear evaluation and in fine-tuning: their
    embeddings are those of RuntimeM2D on the 32 kHz files, and a 12 kHz tone changes them."""
    import soundfile as sf

    from m2d.eval.embeddings import task_embeddings
    from m2d.eval.finetune import FinetuneConfig, FinetuneModel, finetune
    from m2d.eval.tasks import load_task, resolve_task
    path = tmp_path / 'm2d_vit_tiny-80x208p16x16p32k-240101' / 'checkpoint-1.pth'
    path.parent.mkdir()
    path.write_bytes(tiny_ckpt.read_bytes())
    runtime = RuntimeM2D(weight_file=str(path))
    assert runtime.sample_rate == 32000
    embeddings = {}
    for high_tone in (False, True):
        csv = write_32k_task(tmp_path / f'task{int(high_tone)}', high_tone)
        task = load_task(resolve_task(str(csv)))
        embeddings[high_tone], _ = task_embeddings(path, task, batch_size=4, cache_dir='')
        audio = torch.stack([torch.from_numpy(sf.read(f, dtype='float32')[0]) for f in task.files])
        expected = runtime.encode(audio).mean(1)
        torch.testing.assert_close(torch.from_numpy(embeddings[high_tone]), expected, atol=1e-5, rtol=1e-4)
    assert np.abs(embeddings[True] - embeddings[False]).mean() > 0.1 * np.abs(embeddings[False]).mean()

    lengths = []
    forward = FinetuneModel.forward
    monkeypatch.setattr(FinetuneModel, 'forward',
                        lambda self, audio: lengths.append(audio.shape[-1]) or forward(self, audio))
    cfg = FinetuneConfig(lr=0.01, batch_size=4, epochs=1, warmup_epochs=0, mixup=0.0, freq_mask=0, time_mask=0,
                         rrc=False)
    finetune(path, str(csv), cfg, results=None)
    assert lengths and set(lengths) == {16000}  # 0.5 s at 32 kHz: training, valid and test batches
