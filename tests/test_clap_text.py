"""M2D-CLAP's text side: a local Hugging Face text encoder (a tiny random BERT made here), its pooling by
folder-name kind, weights stored in the checkpoint ('TI'), the text projection, and clear errors."""
import sys

import pytest
import torch
import transformers  # in the [test] extra
from conftest import make_checkpoint

from m2d.runtime.runtime import RuntimeM2D

pytestmark = pytest.mark.usefixtures('one_thread')
WORDS = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]', 'a', 'dog', 'barks', 'cat', 'meows', 'loudly', '.']


def tiny_bert(seed: int) -> 'transformers.BertModel':
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=32)
    return transformers.BertModel(config).eval()


@pytest.fixture(scope='module')
def text_folder(tmp_path_factory):
    """A local model folder as save_pretrained writes it: config, weights and tokenizer."""
    folder = tmp_path_factory.mktemp('tiny-bert')
    (folder / 'vocab.txt').write_text('\n'.join(WORDS) + '\n')
    transformers.BertTokenizerFast(vocab_file=str(folder / 'vocab.txt')).save_pretrained(folder)
    tiny_bert(0).save_pretrained(folder)
    return folder


def clap_checkpoint(root, name: str, text_weights=None):
    """A tiny M2D-CLAP checkpoint: MLP audio projection 192 -> 192, text projection 32 -> 192."""
    path = make_checkpoint(root, 'm2d_vit_tiny')
    ckpt = torch.load(path)
    torch.manual_seed(1)
    proj = {'audio_proj.0.weight': torch.randn(192, 192) * 0.05, 'audio_proj.0.bias': torch.zeros(192),
            'audio_proj.2.weight': torch.randn(192, 192) * 0.05, 'audio_proj.2.bias': torch.zeros(192),
            'text_proj.weight': torch.randn(192, 32) * 0.1, 'text_proj.bias': torch.randn(192) * 0.1}
    ckpt['model'].update({**proj, 'norm_stats': torch.tensor([-7.1, 4.2])})
    ckpt['model'].update({'text_encoder.text_encoder.' + k: v for k, v in (text_weights or {}).items()})
    out = root / name / 'checkpoint-1.pth'
    out.parent.mkdir(parents=True)
    torch.save(ckpt, out)
    return out, proj


def expected(bert, folder, texts, proj, pooling):
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    batch = tokenizer(texts, padding=True, return_tensors='pt')
    with torch.no_grad():
        hidden = bert(**batch).last_hidden_state
    mask = batch['attention_mask'][..., None].float()
    pooled = hidden[:, 0] if pooling == 'cls' else (hidden * mask).sum(1) / mask.sum(1)
    return pooled @ proj['text_proj.weight'].T + proj['text_proj.bias']


TEXTS = ['a dog barks .', 'a cat meows loudly .']


def test_text_embeddings_by_kind_and_stored_weights(tmp_path, text_folder):
    # GTE style (kind A, or no kind): masked mean of the last hidden states.
    path, proj = clap_checkpoint(tmp_path, 'm2d_clap_vit_tiny-80x208p16x16p16k-test')
    runtime = RuntimeM2D(weight_file=str(path), text_encoder=str(text_folder))
    emb = runtime.encode_clap_text(TEXTS)
    assert emb.shape == (2, 192) and emb.dtype == torch.float32 and emb.device.type == 'cpu'
    torch.testing.assert_close(emb, expected(tiny_bert(0), text_folder, TEXTS, proj, 'mean'), atol=1e-5, rtol=1e-4)
    # BERT style (pB) with the text encoder's weights stored in the checkpoint (pTI): those are used.
    stored = tiny_bert(7)
    path, proj = clap_checkpoint(tmp_path, 'm2d_clap_vit_tiny-80x208p16x16p16kpBpTI-test', stored.state_dict())
    runtime = RuntimeM2D(weight_file=str(path), text_encoder=str(text_folder))
    torch.testing.assert_close(runtime.encode_clap_text(TEXTS), expected(stored, text_folder, TEXTS, proj, 'cls'),
                               atol=1e-5, rtol=1e-4)
    audio = runtime.encode_clap_audio(torch.zeros(2, 16000).uniform_(-1, 1))
    assert audio.shape == (2, 192)  # the shared space: cosine similarities between the two are defined
    similarity = torch.nn.functional.cosine_similarity(audio[:, None], runtime.encode_clap_text(TEXTS)[None], -1)
    assert similarity.shape == (2, 2)


def test_text_encoder_errors(tmp_path, text_folder, monkeypatch):
    path, _ = clap_checkpoint(tmp_path, 'm2d_clap_vit_tiny-80x208p16x16p16k-test')
    with pytest.raises(ValueError, match='set text_encoder= to a local folder.*nothing is downloaded'):
        RuntimeM2D(weight_file=str(path)).encode_clap_text(TEXTS)
    with pytest.raises(FileNotFoundError, match='text encoder folder not found'):
        RuntimeM2D(weight_file=str(path), text_encoder=str(tmp_path / 'nowhere')).encode_clap_text(TEXTS)
    monkeypatch.setitem(sys.modules, 'transformers', None)
    with pytest.raises(ImportError, match='pip install transformers'):
        RuntimeM2D(weight_file=str(path), text_encoder=str(text_folder)).encode_clap_text(TEXTS)
    nv, _ = clap_checkpoint(tmp_path, 'm2d_clap_vit_tiny-80x208p16x16p16kpN-test')
    with pytest.raises(ValueError, match="text encoder kind 'N'"):
        RuntimeM2D(weight_file=str(nv), text_encoder=str(text_folder)).encode_clap_text(TEXTS)
    with pytest.raises(ValueError, match='not an M2D-CLAP checkpoint'):
        RuntimeM2D(weight_file=str(make_checkpoint(tmp_path / 'plain'))).encode_clap_audio(torch.zeros(1, 16000))
