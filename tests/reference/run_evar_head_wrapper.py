"""Run EVAR HEAD's own M2D wrapper (evar/ar_m2d.py: AR_M2D, AR_M2D_CLAP) on this repository's runtime, with
tests/evar_stub standing in for the rest of EVAR. A developer check, not part of the test suite:

    python tests/reference/run_evar_head_wrapper.py [/path/to/evar/ar_m2d.py]

(default: ../shared/reference/evar_head_ar_m2d.py). Prints what each call returned; exits non-zero on failure.
"""
import importlib.util
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path[:0] = [str(REPO), str(REPO / 'tests'), str(REPO / 'tests' / 'evar_stub')]
from conftest import make_checkpoint  # noqa: E402
from evar.ar_base import EasyDict  # noqa: E402
from test_evar_head import HEAD_CONFIG  # noqa: E402


def main(wrapper_file: Path) -> None:
    spec = importlib.util.spec_from_file_location('evar_head_ar_m2d', wrapper_file)
    head = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(head)
    audio = torch.zeros(2, 40000).uniform_(-1, 1)
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        weight = make_checkpoint(Path(tmp))
        for layers in ([-1], [-1, 0]):
            ar = head.AR_M2D(EasyDict({**HEAD_CONFIG, 'weight_file': str(weight), 'output_layers': layers})).eval()
            ar.precompute('cpu', None)
            frames, emb = ar.encode_frames(audio), ar(audio)
            print(f'AR_M2D output_layers={layers}: norm_stats {ar.norm_stats}, feature_d {ar.cfg.feature_d}, '
                  f'encode_frames {list(frames.shape)}, forward {list(emb.shape)}')
        ckpt = torch.load(weight)
        projection = {f'audio_proj.{i}.{p}': torch.randn(192, 192) * 0.05 if p == 'weight' else torch.zeros(192)
                      for i in (0, 2) for p in ('weight', 'bias')}
        ckpt['model'].update({'norm_stats': torch.tensor([-7.2, 4.3]), 'text_proj.weight': torch.eye(192),
                              **projection})
        clap = Path(tmp) / 'm2d_clap_vit_tiny-80x208p16x16p16k-test' / 'checkpoint-1.pth'
        clap.parent.mkdir()
        torch.save(ckpt, clap)
        cfg = EasyDict({**HEAD_CONFIG, 'audio_repr': 'ar_m2d.AR_M2D_CLAP', 'weight_file': str(clap),
                        'flat_features': True, 'mean': None, 'std': None})
        ar = head.AR_M2D_CLAP(cfg).eval()
        ar.precompute('cpu', None)
        emb = ar.encode_audio(audio)
        same = torch.allclose(emb, ar.runtime.encode_clap_audio(audio), atol=1e-5)
        print(f'AR_M2D_CLAP: norm_stats {ar.norm_stats}, encode_audio {list(emb.shape)}, '
              f'equals encode_clap_audio: {same}')
        if not same:
            sys.exit('AR_M2D_CLAP.encode_audio differs from RuntimeM2D.encode_clap_audio')


if __name__ == '__main__':
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else REPO.parent / 'shared' / 'reference' / 'evar_head_ar_m2d.py')
