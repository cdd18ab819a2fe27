"""HF text tower query cache: single-text results are reused bitwise, batches bypass it, LRU eviction."""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import pytest
import torch

from atae.towers.hf_text import HFTextTower
from test_hf_text import _tiny_roberta


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny random RoBERTa of test_hf_text (word-level tokenizer, saved to a folder, no download)."""
    return _tiny_roberta(tmp_path_factory.mktemp("tiny_roberta_cache"))


def _reference(root, vocab, text):
    """Second method: ids by hand, the saved model run alone, penultimate hidden state."""
    from transformers import RobertaModel

    ids = torch.tensor([[0] + [vocab[w] for w in text.split()] + [2]])
    with torch.no_grad():
        return RobertaModel.from_pretrained(root).eval()(input_ids=ids, output_hidden_states=True) \
            .hidden_states[-2][0].numpy()


class ModelRan(Exception):
    pass


@contextmanager
def model_off(*towers):
    """While inside, running a tower's transformer raises ModelRan: what still answers came from its cache."""
    def ran(**_):
        raise ModelRan

    saved = [t.model for t in towers]
    for t in towers:
        t.model = ran
    try:
        yield
    finally:
        for t, m in zip(towers, saved, strict=True):
            t.model = m


def test_cached_equals_uncached_bitwise(tiny):
    root, vocab = tiny
    cached, plain = HFTextTower(root), HFTextTower(root, cache_size=0)
    text = "a dog barks on the roof"
    first = cached.encode([text])[0]
    with model_off(cached, plain):
        second = cached.encode([text])[0]  # a repeated query is answered without the model
        with pytest.raises(ModelRan):
            plain.encode([text])  # cache_size=0: every query runs the model
    uncached = plain.encode([text])[0]
    assert np.array_equal(first, second) and np.array_equal(second, uncached)
    assert second.dtype == np.float32 and second.flags.writeable
    np.testing.assert_allclose(second, _reference(root, vocab, text), atol=1e-5)


def test_caller_writes_do_not_reach_the_cache(tiny):
    root, vocab = tiny
    tower = HFTextTower(root)
    z = tower.encode(["rain falls"])[0]
    z[:] = 0.0
    with model_off(tower):
        again = tower.encode(["rain falls"])[0]
    np.testing.assert_allclose(again, _reference(root, vocab, "rain falls"), atol=1e-5)


def test_lru_eviction_and_batches_bypass(tiny):
    root, _ = tiny
    tower = HFTextTower(root, cache_size=2)
    for t in ("a dog", "the cat", "a dog", "bird sings"):  # "a dog" touched again: "the cat" is evicted
        tower.encode([t])
    with model_off(tower):
        tower.encode(["a dog"])
        tower.encode(["bird sings"])
        with pytest.raises(ModelRan):
            tower.encode(["the cat"])
    tower.encode(["the cat"])  # now "a dog" (least recently used) goes
    with model_off(tower), pytest.raises(ModelRan):
        tower.encode(["a dog"])
    batch = tower.encode(["the cat", "loud rain"])  # batches neither read nor fill the cache
    with model_off(tower):
        with pytest.raises(ModelRan):
            tower.encode(["the cat", "bird sings"])
        with pytest.raises(ModelRan):
            tower.encode(["loud rain"])
    assert batch[0].shape == tower.encode(["the cat"])[0].shape
    tower.clear_cache()
    with model_off(tower), pytest.raises(ModelRan):
        tower.encode(["the cat"])


def test_a_last_layer_pass_fills_the_penultimate_towers_cache(tiny):
    """The bridge's last-layer tower feeds the adapter's penultimate-layer tower: the adapter's query then
    needs no model run, and is bitwise equal to what a tower of its own computes (and to the model run by
    hand)."""
    root, vocab = tiny
    adapter, bridge_side, alone = HFTextTower(root), HFTextTower(root, layer=-1), HFTextTower(root)
    assert bridge_side.feed(adapter) and not adapter.feed(bridge_side)  # -2 cannot give layer -1
    text = "a dog barks on the roof"
    bridge_side.encode([text])
    with model_off(adapter):
        got = adapter.encode([text])[0]
    assert np.array_equal(got, alone.encode([text])[0])
    np.testing.assert_allclose(got, _reference(root, vocab, text), atol=1e-5)
    bridge_side.encode(["rain falls", "wind"])  # batches never feed the cache
    with model_off(adapter), pytest.raises(ModelRan):
        adapter.encode(["wind"])


def test_feed_refuses_another_model_or_truncation(tiny, tmp_path):
    root, _ = tiny
    other_root, _ = _tiny_roberta(tmp_path / "other")
    last = HFTextTower(root, layer=-1)
    assert not last.feed(HFTextTower(other_root))
    assert not last.feed(HFTextTower(root, max_length=4))
    assert not last.feed(last)
