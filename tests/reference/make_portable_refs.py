"""Record the later M2D runtime's outputs (portable_m2d.py) on random weights in every layout of
tests/portable_layouts.py, for tests/test_later_formats.py.

    python tests/reference/make_portable_refs.py [/path/to/folder/with/portable_m2d.py]

portable_m2d.py is nttcslab/m2d's examples/portable_m2d.py (default folder: ../shared/reference).
Writes tests/reference/portable_m2d_refs.npz: per layout its outputs ('<layout>/encode', every
SUBSAMPLE-th feature; '<layout>/logits' likewise; '<layout>/clap_audio' in full).
"""
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/: portable_layouts
from portable_layouts import LAYOUTS, SUBSAMPLE  # noqa: E402

OUT = HERE / 'portable_m2d_refs.npz'


def main(reference_dir: Path) -> None:
    sys.path.insert(0, str(reference_dir))
    from portable_m2d import PortableM2D
    torch.set_grad_enabled(False)
    refs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for layout in LAYOUTS:
            model = PortableM2D(str(layout.save(tmp)), **layout.portable).eval()
            audio = layout.audio()
            outputs = {'encode': lambda: model.encode(audio)[..., ::SUBSAMPLE],
                       'logits': lambda: model(audio)[..., ::SUBSAMPLE],
                       'clap_audio': lambda: model.encode_clap_audio(audio)}
            for name in layout.outputs:
                refs[f'{layout.name}/{name}'] = outputs[name]().numpy().astype(np.float32)
                print(layout.name, name, refs[f'{layout.name}/{name}'].shape, flush=True)
            Path(tmp, layout.path).unlink()
    np.savez_compressed(OUT, **refs)
    print(f'wrote {OUT} ({OUT.stat().st_size / 1e3:.0f} kB)')


if __name__ == '__main__':
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE.parents[2] / 'shared' / 'reference')
