"""Evaluation: model + cached features + dataset -> a (queries x clips) score matrix -> DCASE metrics.

Everything goes through one generic step, :func:`evaluate_scores`, which takes any ``(Q, C)`` score
matrix (the trained adapters' cosine, a zero-shot tag bridge, a hybrid of both) and the relevant clips:

* DCASE 2022 (``relevant[q]`` is one column index): every caption is a query with exactly one relevant
  clip; R@1/5/10 and mAP@10 (= 1/rank within 10), jackknife 95% intervals (``atae.metrics``).
* DCASE 2025 (``relevant[q]`` is a set of columns): AP@10 over several relevant clips, R@k = any relevant
  clip in the top k.

Ranking ties go to the earlier candidate (stable sort), as in ``atae.metrics``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from atae.errors import DataError, ModelError
from atae.features import dataset_queries
from atae.io import atomic_write_text
from atae.model import AlignedModel
from atae.scoring import SCORERS, Fusion, adapter_scores, check_hybrid_tower, hybrid_scores

TOP_K = 10


@dataclass
class EvalResult:
    metrics: dict  # {"R@1": {"value", "ci_low", "ci_high", ...}, ..., "mAP@10": ...}
    per_query: dict[str, np.ndarray]
    ranked_keys: list[list[str]]  # top-10 candidate keys per query, best first
    queries: list[str]
    candidates: list[str]
    mode: str  # "dcase2022" | "dcase2025"
    problems: list[str] = field(default_factory=list)

    def to_dict(self, **extra) -> dict:
        out = {name: {k: _num(v) for k, v in m.items()} for name, m in self.metrics.items()}
        out["_info"] = {"mode": self.mode, "queries": len(self.queries), "candidates": len(self.candidates),
                        "problems": self.problems, **extra}
        return out

    def write_json(self, path: str | Path, **extra) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(self.to_dict(**extra), indent=2, default=_num))
        return path

    def submission_rows(self) -> list[tuple[str, list[str]]]:
        return [(q, keys[:TOP_K]) for q, keys in zip(self.queries, self.ranked_keys, strict=True)]

    def write_submission(self, path: str | Path) -> Path:
        from atae.metrics import write_submission

        return write_submission(path, self.submission_rows())


def _num(v):
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, float) and v != v:  # NaN is not JSON
        return None
    return v


# ------------------------------------------------------------------------------------- generic step
def top_k_indices(scores: np.ndarray, k: int = TOP_K, chunk: int = 2048) -> np.ndarray:
    """(Q, min(k, C)) candidate indices, best first; ties to the lower index."""
    s = np.asarray(scores)
    kk = min(k, s.shape[1])
    out = np.empty((s.shape[0], kk), dtype=np.int64)
    for a in range(0, s.shape[0], chunk):
        blk = -s[a:a + chunk]
        if kk < s.shape[1]:
            # candidates scoring at least the k-th best, then a stable sort among them only
            kth = np.partition(blk, kk - 1, axis=1)[:, kk - 1:kk]
            for i, row in enumerate(blk):
                cand = np.flatnonzero(row <= kth[i, 0])
                out[a + i] = cand[np.argsort(row[cand], kind="stable")][:kk]
        else:
            out[a:a + chunk] = np.argsort(blk, axis=1, kind="stable")[:, :kk]
    return out


def evaluate_scores(scores, relevant: Sequence, *, queries: Sequence[str], candidates: Sequence[str],
                    problems: Sequence[str] = ()) -> EvalResult:
    """Metrics of any (Q, C) score matrix. ``relevant[q]``: an int (DCASE 2022) or a collection of ints
    (DCASE 2025 multi-positive) -- all queries of one kind."""
    from atae.metrics import metrics_table, per_query_dcase2022, per_query_multi, ranks_single

    s = np.asarray(scores, dtype=np.float32)
    if s.shape != (len(queries), len(candidates)):
        raise ValueError(f"scores {s.shape} do not match {len(queries)} queries x "
                         f"{len(candidates)} candidates")
    if len(queries) == 0:
        raise DataError("nothing to evaluate: no query", fix="check the caption/query file")
    single = all(isinstance(r, (int, np.integer)) for r in relevant)
    if single:
        per_query = per_query_dcase2022(ranks_single(s, np.asarray(relevant, dtype=np.int64)))
        mode = "dcase2022"
    else:
        per_query = per_query_multi(s, [list(r) for r in relevant], k=TOP_K)
        mode = "dcase2025"
    order = top_k_indices(s, TOP_K)
    cands = list(candidates)
    ranked = [[cands[j] for j in row] for row in order]
    return EvalResult(metrics_table(per_query), per_query, ranked, list(queries), cands, mode, list(problems))


# ------------------------------------------------------------------------------------------ scoring
def check_towers(model: AlignedModel, audio_info=None, text_info=None) -> None:
    """Refuse features from other towers than the ones the model was trained on (numbers would be junk)."""
    for side, want, got in (("audio", model.audio_info, audio_info), ("text", model.text_info, text_info)):
        if got is None:
            continue
        if want.key() != got.key():
            raise ModelError(
                f"the model was trained on {side} tower {want.name!r} ({want.key()}) but the features come "
                f"from {got.name!r} ({got.key()})",
                fix=f"use the {side} encoder and weights the model was trained with ({want.name})")


def score_matrix(model: AlignedModel, audio_table, audio_keys: Sequence[str],
                 text_seqs: Sequence[np.ndarray]) -> np.ndarray:
    """(Q, C) float32 cosine of every text sequence with every cached clip (the adapter scorer)."""
    return adapter_scores(model, [audio_table.get(k) for k in audio_keys], text_seqs)


def encode_texts(text_tower, texts: Sequence[str], *, batch: int = 256) -> list[np.ndarray]:
    out: list[np.ndarray] = []
    for a in range(0, len(texts), batch):
        out += text_tower.encode(list(texts[a:a + batch]))
    return out


# ---------------------------------------------------------------------------------------- datasets
def evaluate_dataset(model: AlignedModel, dataset, audio_table, text_table) -> EvalResult:
    """DCASE 2022 text->audio: every caption a query, its own clip the one relevant candidate."""
    check_towers(model, getattr(audio_table, "info", None), getattr(text_table, "info", None))
    cands, texts, tkeys, rel, problems = dataset_queries(dataset, audio_table, text_table)
    seqs = [np.asarray(text_table.get(k)) for k in tkeys]
    scores = score_matrix(model, audio_table, cands, seqs)
    return evaluate_scores(scores, rel, queries=texts, candidates=cands, problems=problems)


def query_relevance(queries, candidates: Sequence[str]) -> tuple[list, list[str], list[int]]:
    """Relevant columns of DCASE 2025 queries; a relevant file that is not a candidate is reported, a
    query left with none is dropped (it cannot be scored). Returns (sets, problems, kept query idx)."""
    col = {k: j for j, k in enumerate(candidates)}
    # query files name bare files; candidates may sit in sub-folders, and Clotho writes ':' for '_'
    alt: dict[str, int | None] = {}
    for j, k in enumerate(candidates):
        for name in {k.replace(":", "_"), k.rsplit("/", 1)[-1].replace(":", "_")}:
            alt[name] = None if name in alt and alt[name] != j else j  # ambiguous basename -> no match
    sets, problems, kept = [], [], []
    for qi, q in enumerate(queries):
        rel = []
        for f in q.relevant:
            j = col.get(f)
            if j is None:
                j = alt.get(f.replace(":", "_"))
            if j is None:
                problems.append(f"query {q.text!r}: relevant file {f!r} is not among the candidates")
            else:
                rel.append(j)
        if rel:
            sets.append(sorted(set(rel)))
            kept.append(qi)
        else:
            problems.append(f"query {q.text!r}: none of its relevant files is a candidate, query left out")
    return sets, problems, kept


def evaluate_queries(model: AlignedModel, queries, audio_table, text_tower,
                     audio_keys: Sequence[str] | None = None) -> EvalResult:
    """DCASE 2025 multi-positive: each query against every candidate clip (default: all cached keys)."""
    check_towers(model, getattr(audio_table, "info", None), getattr(text_tower, "info", None))
    cands = list(audio_keys) if audio_keys is not None else list(audio_table.keys)
    sets, problems, kept = query_relevance(queries, cands)
    texts = [queries[i].text for i in kept]
    scores = score_matrix(model, audio_table, cands, encode_texts(text_tower, texts))
    return evaluate_scores(scores, sets, queries=texts, candidates=cands, problems=problems)


# -------------------------------------------------------------------------------- command plumbing
def towers_for_model(model: AlignedModel, *, audio_weights=None, text_weights=None, need_text: bool = True,
                     device: str = "cpu"):
    """Rebuild the towers named in a model's config on ``device`` and check they produce the same numbers
    the model was trained on. Weights: the explicit path, else the file the model remembers, else the
    registry's places, each checked by SHA-256 (``atae.towers.trained_with``)."""
    from atae.towers.trained_with import audio_tower_for, text_tower_for

    files = model.weights_files
    audio = audio_tower_for(model.audio_info, explicit=audio_weights, remembered=files.get("audio"),
                            device=device)
    text = None
    if need_text:
        text = text_tower_for(model.text_info, explicit=text_weights, remembered=files.get("text"),
                              device=device)
    check_towers(model, audio.info, text.info if text is not None else None)
    return audio, text


def scores_for(scorer: str, *, candidates: Sequence[str], texts: Sequence[str], audio_table,
               model: AlignedModel | None = None, text_seqs: Sequence[np.ndarray] | None = None,
               text_tower=None, audio_tower=None, temperature: float | None = None) -> np.ndarray:
    """(Q, C) scores of ``texts`` against cached clips ``candidates`` with one scorer (``atae.scoring``):

    * ``adapter``: cosine of the trained adapters (``text_seqs``: cached token sequences, else the text
      tower encodes ``texts``);
    * ``bridge``: zero-shot AudioSet tag bridge (``atae.bridge``), no trained model needed; temperature
      from the argument, else the model's stored one, else the bridge default;
    * ``hybrid``: the model's fusion of both (``atae.scoring.Fusion``).
    """
    from atae import bridge as br

    if scorer not in SCORERS:
        raise DataError(f"unknown scorer {scorer!r}", fix=f"use one of {', '.join(SCORERS)}")
    adapter = text_vectors = None
    if scorer in ("adapter", "hybrid"):
        if model is None:
            raise ModelError(f"the {scorer!r} scorer needs a trained model", fix="pass the RUN folder")
        if text_seqs is None:
            text_seqs = encode_texts(text_tower, texts)
        text_vectors = model.encode_text(text_seqs)
        adapter = adapter_scores(model, [audio_table.get(k) for k in candidates], text_vectors=text_vectors)
    if scorer == "adapter":
        return adapter
    if audio_tower is not None:
        br.require_tag_head(audio_tower)
        if scorer == "hybrid":
            check_hybrid_tower(model, audio_tower.info)
    tb = br.TagBridge(text_tower, temperature=temperature or br.bridge_temperature(model))
    bridge = tb.scores(list(texts), tb.clip_tags([audio_table.tags(k) for k in candidates]))
    if scorer == "bridge":
        return np.asarray(bridge, dtype=np.float32)
    return hybrid_scores(adapter, bridge, Fusion.of(model).weights(text_vectors))


def evaluate_run(run_dir=None, *, audio_dir, json_out=None, csv=None, queries=None, submission=None,
                 feats=None, scorer: str = "adapter", audio_encoder: str | None = None, audio_weights=None,
                 text_encoder: str | None = None, text_weights=None, temperature: float | None = None,
                 progress: bool = True, device: str = "auto") -> EvalResult:
    """``atae evaluate``: load a trained run (or, for ``scorer="bridge"``, just the towers), extract the
    dataset's features (cached, resumable) and evaluate.

    ``csv``: a Clotho-format caption file (DCASE 2022 mode). ``queries``: a DCASE 2025 query file; the
    candidates are all audio files under ``audio_dir``. Features go to ``feats`` (default RUN/features,
    or ./atae-features without a RUN). Towers and adapters run on ``device`` (``atae.device``).
    """
    from atae.device import resolve_device
    from atae.features import ensure_dataset_features

    dev = str(resolve_device(device))  # first: a device that is not there fails before any work
    if (csv is None) == (queries is None):
        raise DataError("give exactly one of --csv (captions) or --queries (DCASE 2025 query file)")
    if scorer not in SCORERS:
        raise DataError(f"unknown scorer {scorer!r}", fix=f"use one of {', '.join(SCORERS)}")
    model = None
    if run_dir is not None:
        model = AlignedModel.load(run_dir).to(dev)
    elif scorer != "bridge":
        raise ModelError(f"the {scorer!r} scorer needs a trained model folder (RUN)",
                         fix="pass RUN, or use --scorer bridge with --audio-encoder (zero-shot)")
    if model is not None:
        if audio_encoder is not None and audio_encoder != model.audio_info.name:
            raise ModelError(f"the model was trained on audio tower {model.audio_info.name!r}, "
                             f"not {audio_encoder!r}", path=run_dir,
                             fix="leave out --audio-encoder: the model's config names its towers")
        audio_tower, text_tower = towers_for_model(model, audio_weights=audio_weights,
                                                   text_weights=text_weights, device=dev)
    else:
        from atae.towers.registry import get_towers

        if audio_encoder is None:
            raise DataError("--scorer bridge without a RUN needs --audio-encoder (a tower with an AudioSet "
                            "head)", fix="e.g. --audio-encoder efficientat-mn04 --audio-weights W")
        audio_tower, text_tower = get_towers(audio_encoder, audio_weights, text_encoder, text_weights,
                                             device=dev)
    if scorer in ("bridge", "hybrid"):
        from atae.bridge import require_tag_head

        require_tag_head(audio_tower)
    audio_dir = Path(audio_dir)
    if feats is None:
        feats = Path(run_dir) / "features" if run_dir is not None else Path("atae-features")
    if csv is not None:
        from atae.data import read_caption_csv

        ds = read_caption_csv(csv, audio_dir)
        atab, ttab, report = ensure_dataset_features(ds, audio_tower, text_tower, feats, progress=progress)
        if model is not None:
            check_towers(model, atab.info, ttab.info)
        cands, texts, tkeys, rel, problems = dataset_queries(ds, atab, ttab)
        seqs = [np.asarray(ttab.get(k)) for k in tkeys]
        problems = list(ds.problems) + _report_problems(report) + problems
    else:
        from atae.data import folder_dataset, read_queries_csv

        qs = read_queries_csv(queries)
        ds = folder_dataset(audio_dir)
        atab, _, report = ensure_dataset_features(ds, audio_tower, text_tower, feats, progress=progress)
        if model is not None:
            check_towers(model, atab.info, text_tower.info)
        cands = [c.key for c in ds.clips if c.key in atab]
        rel, problems, kept = query_relevance(qs, cands)
        texts = [qs[i].text for i in kept]
        seqs = None
        problems = _report_problems(report) + problems
    scores = scores_for(scorer, candidates=cands, texts=texts, audio_table=atab, model=model, text_seqs=seqs,
                        text_tower=text_tower, audio_tower=audio_tower, temperature=temperature)
    res = evaluate_scores(scores, rel, queries=texts, candidates=cands, problems=problems)
    extra = {"run": str(run_dir) if run_dir is not None else None, "scorer": scorer,
             "audio_tower": audio_tower.info.name, "text_tower": text_tower.info.name,
             "data": str(csv or queries)}
    if json_out is not None:
        res.write_json(json_out, **extra)
    if submission is not None:
        res.write_submission(submission)
    return res


def _report_problems(report) -> list[str]:
    failed = getattr(report, "failed", None) or []
    return [f"{p}: {r}" for p, r in failed]


def format_metrics(metrics: dict) -> str:
    """One line per metric: value and 95% interval."""
    from atae.metrics import METRIC_NAMES

    lines = []
    for name in METRIC_NAMES:
        if name in metrics:
            m = metrics[name]
            lines.append(f"{name:>7}  {m['value']:.4f}  ({_fmt(m['ci_low'])} - {_fmt(m['ci_high'])})")
    return "\n".join(lines)


def _fmt(x) -> str:
    return "n/a" if x is None or x != x else f"{x:.4f}"
