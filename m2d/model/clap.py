"""M2D-CLAP heads: the audio and text projections into the shared embedding space, and the text encoder.

Projections are rebuilt from the shapes of their checkpoint entries:
- an MLP `audio_proj.{0,2}.*` (M2D-CLAP 2024: Linear, ReLU, Linear on the mean of all patch tokens);
- a semantic-token projector `audio_proj.{sem_token,sem_blocks.N.*,norm.*}` (M2D-CLAP 2025: a [SEM] token
  attends to all patch tokens through a few one-head ViT blocks);
- `text_proj.{weight,bias}` (Linear) or `text_proj.{0,2}.*` (MLP); absent ones are identities.

The text encoder is a Hugging Face `transformers` model loaded from a local folder (saved with
save_pretrained: config, tokenizer and weights); nothing is ever downloaded. The folder name's text
encoder part says how its outputs are pooled: 'A' (or none) GTE-base style, the attention-masked mean of
the last hidden states; 'B' BERT style, the [CLS] state. Weights stored in the checkpoint
(`text_encoder.*`, the 'TI' files) replace the folder's.
"""
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
from timm.models.vision_transformer import Block

from m2d.checkpoint import count_blocks, load_state_strict
from m2d.errors import CheckpointError

TEXT_POOLING = {'A': 'mean', 'B': 'cls'}  # folder-name text encoder part -> pooling


class SemanticProjector(nn.Module):
    """Tokens [B, N, D] -> [B, D]: a learnt [SEM] token prepended (no positions), one-head ViT blocks,
    then the LayerNorm of the [SEM] output. The result does not depend on the token order."""

    def __init__(self, dim: int, depth: int, mlp_ratio: float):
        super().__init__()
        self.sem_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.sem_blocks = nn.ModuleList([Block(dim, 1, mlp_ratio, qkv_bias=True, norm_layer=nn.LayerNorm)
                                         for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.sem_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        for block in self.sem_blocks:
            x = block(x)
        return self.norm(x[:, 0])


def _mlp(state: dict) -> nn.Module:
    (hidden, dim), out = state['0.weight'].shape, state['2.weight'].shape[0]
    return nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, out))


def projection_from_state(state: Optional[dict[str, torch.Tensor]], what: str) -> nn.Module:
    """The projection whose weights `state` holds (prefix removed), with the weights loaded; None -> Identity."""
    if state is None:
        return nn.Identity()
    if 'sem_token' in state:
        dim = state['sem_token'].shape[-1]
        module = SemanticProjector(dim, count_blocks(state, 'sem_blocks'),
                                   state['sem_blocks.0.mlp.fc1.weight'].shape[0] / dim)
    elif '0.weight' in state and '2.weight' in state:
        module = _mlp(state)
    elif 'weight' in state:
        module = nn.Linear(state['weight'].shape[1], state['weight'].shape[0], bias='bias' in state)
    else:
        raise CheckpointError(f'unknown {what} layout in the checkpoint: {", ".join(list(state)[:8])}')
    load_state_strict(module, state, what)
    return module


class TextEncoder(nn.Module):
    """Texts -> pooled text-encoder states [B, Dt], from a local Hugging Face model folder."""

    def __init__(self, folder: str, kind: str = 'A', weights: Optional[dict[str, torch.Tensor]] = None):
        super().__init__()
        if kind not in TEXT_POOLING:
            raise ValueError(f"text encoder kind {kind!r} (from the folder name) is not supported; supported: "
                             f"{', '.join(TEXT_POOLING)} (GTE-base style, BERT style)")
        if not folder:
            raise ValueError('encode_clap_text needs the text encoder: set text_encoder= to a local folder holding the '
                             'Hugging Face model (e.g. gte-base or bert-base-uncased saved with save_pretrained); '
                             'nothing is downloaded')
        if not Path(folder).is_dir():
            raise FileNotFoundError(f'text encoder folder not found: {folder}')
        try:
            from transformers import AutoModel, AutoTokenizer
        except ImportError:
            raise ImportError('encode_clap_text needs the transformers package: pip install transformers') from None
        self.pooling = TEXT_POOLING[kind]
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.model = AutoModel.from_pretrained(folder, local_files_only=True)
        if weights:
            # Saved as the later runtime's encoder wrapper: 'text_encoder.*' (BERT style) or 'model.*' (GTE style).
            wrapper = next((p for p in ('text_encoder.', 'model.') if all(k.startswith(p) for k in weights)), '')
            weights = {k.removeprefix(wrapper): v for k, v in weights.items()}
            own = self.model.state_dict()  # position_ids were a saved buffer in older transformers
            weights = {k: v for k, v in weights.items() if k in own or not k.endswith('position_ids')}
            load_state_strict(self.model, weights, f'the text encoder in {folder}')
        self.model.eval()

    def forward(self, texts: list[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        batch = self.tokenizer(list(texts), padding=True, truncation=True, return_tensors='pt').to(device)
        hidden = self.model(**batch).last_hidden_state
        if self.pooling == 'cls':
            return hidden[:, 0]
        mask = batch['attention_mask'][..., None].to(hidden.dtype)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1)
