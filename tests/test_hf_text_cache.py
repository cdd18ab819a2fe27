"""HF text tower query cache: single-text results are reused bitwise, batches bypass it, LRU eviction."""

from __future__ import annotations

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


def test_cached_equals_uncached_bitwise(tiny):
    root, vocab = tiny
    cached, plain = HFTextTower(root), HFTextTower(root, cache_size=0)
    text = "a dog barks on the roof"
    first = cached.encode([text])[0]
    second = cached.encode([text])[0]
    assert (cached.cache_hits, cached.cache_misses) == (1, 1)
    uncached = plain.encode([text])[0]
    assert plain.cache_hits == plain.cache_misses == 0
    assert np.array_equal(first, second) and np.array_equal(second, uncached)
    assert second.dtype == np.float32 and second.flags.writeable
    np.testing.assert_allclose(second, _reference(root, vocab, text), atol=1e-5)


def test_caller_writes_do_not_reach_the_cache(tiny):
    root, vocab = tiny
    tower = HFTextTower(root)
    z = tower.encode(["rain falls"])[0]
    z[:] = 0.0
    again = tower.encode(["rain falls"])[0]
    assert tower.cache_hits == 1
    np.testing.assert_allclose(again, _reference(root, vocab, "rain falls"), atol=1e-5)


def test_lru_eviction_and_batches_bypass(tiny):
    root, _ = tiny
    tower = HFTextTower(root, cache_size=2)
    for t in ("a dog", "the cat", "a dog", "bird sings"):  # "a dog" touched again: "the cat" is evicted
        tower.encode([t])
    assert (tower.cache_hits, tower.cache_misses) == (1, 3)
    assert list(tower._cache) == ["a dog", "bird sings"]
    tower.encode(["the cat"])
    assert tower.cache_misses == 4 and list(tower._cache) == ["bird sings", "the cat"]
    batch = tower.encode(["the cat", "loud rain"])  # batches neither read nor fill the cache
    assert (tower.cache_hits, tower.cache_misses) == (1, 4) and "loud rain" not in tower._cache
    assert batch[0].shape == tower.encode(["the cat"])[0].shape
    tower.clear_cache()
    assert not tower._cache


def test_a_last_layer_pass_fills_the_penultimate_towers_cache(tiny):
    """The bridge's last-layer tower feeds the adapter's penultimate-layer tower: the adapter's query is
    then a cache hit, bitwise equal to what a tower of its own computes (and to the model run by hand)."""
    root, vocab = tiny
    adapter, bridge_side, alone = HFTextTower(root), HFTextTower(root, layer=-1), HFTextTower(root)
    assert bridge_side.feed(adapter) and not adapter.feed(bridge_side)  # -2 cannot give layer -1
    text = "a dog barks on the roof"
    bridge_side.encode([text])
    got = adapter.encode([text])[0]
    assert (adapter.cache_hits, adapter.cache_misses) == (1, 0)
    assert np.array_equal(got, alone.encode([text])[0])
    np.testing.assert_allclose(got, _reference(root, vocab, text), atol=1e-5)
    adapter.encode(["rain falls", "wind"])  # batches never touch the cache, fed or not
    bridge_side.encode(["rain falls", "wind"])
    assert list(adapter._cache) == [text]


def test_feed_refuses_another_model_or_truncation(tiny, tmp_path):
    root, _ = tiny
    other_root, _ = _tiny_roberta(tmp_path / "other")
    last = HFTextTower(root, layer=-1)
    assert not last.feed(HFTextTower(other_root))
    assert not last.feed(HFTextTower(root, max_length=4))
    assert not last.feed(last)
