"""Retrieval metrics as pure functions of scores and rankings (numpy only).

Two evaluation modes:

* DCASE 2022 task 6b (one relevant clip per caption): R@1, R@5, R@10 and mAP@10 (= 1/rank within the
  top 10), each summarised by the jackknife exactly as the official ``eval_script.py`` does through
  ``astropy.stats.jackknife.jackknife_stats`` (the reported "value" is the jackknife estimate).
* DCASE 2025 (several relevant clips per query): AP@k = sum over the relevant hits within the top k of
  precision@rank, divided by min(number of relevant clips, k); R@k = any relevant clip in the top k.

Ties in scores are broken stably: of two clips with the same score, the one with the lower column index
(earlier in the candidate list) ranks first. This makes rankings reproducible across runs and machines.
"""

from __future__ import annotations

import csv
import io
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from atae.errors import DataError
from atae.io import atomic_open

#: sqrt(2) * erfinv(0.95), the z-score astropy's jackknife_stats uses for a 95% interval.
Z_95 = 1.9599639845400538

METRIC_NAMES = ("R@1", "R@5", "R@10", "mAP@10")
SUBMISSION_TOP_K = 10
SUBMISSION_HEADER = ["caption"] + [f"file_name_{i}" for i in range(1, SUBMISSION_TOP_K + 1)]


# ---------------------------------------------------------------------------------------------- ranks
def _check_scores(scores) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2:
        raise ValueError(f"scores must be a (queries, clips) matrix, got shape {s.shape}")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN: the model produced invalid embeddings")
    return s


def ranks_single(scores, relevant) -> np.ndarray:
    """1-based rank of each query's single relevant clip (column index ``relevant[q]``).

    rank = 1 + (clips scoring strictly higher) + (clips scoring equal with a lower index): a stable
    descending sort, so ties go to the earlier clip.
    """
    s = _check_scores(scores)
    rel = np.asarray(relevant, dtype=np.int64)
    if rel.shape != (s.shape[0],):
        raise ValueError(f"relevant must have one clip index per query ({s.shape[0]}), got {rel.shape}")
    if rel.size and (rel.min() < 0 or rel.max() >= s.shape[1]):
        raise ValueError(f"relevant clip index out of range 0..{s.shape[1] - 1}")
    ranks = np.empty(s.shape[0], dtype=np.int64)
    cols = np.arange(s.shape[1])
    step = max(1, 2_000_000 // max(1, s.shape[1]))  # bound the temporary (step, C) boolean arrays
    for a in range(0, s.shape[0], step):
        blk = s[a:a + step]
        r = rel[a:a + step]
        target = blk[np.arange(len(r)), r][:, None]
        higher = (blk > target).sum(axis=1)
        tied_before = ((blk == target) & (cols[None, :] < r[:, None])).sum(axis=1)
        ranks[a:a + step] = 1 + higher + tied_before
    return ranks


def recall_at_k(ranks, k: int) -> np.ndarray:
    """Per-query R@k for single-relevant ranks: 1.0 if rank <= k else 0.0."""
    return (np.asarray(ranks) <= k).astype(np.float64)


def map_at_k(ranks, k: int = 10) -> np.ndarray:
    """Per-query AP@k with one relevant clip: 1/rank within the top k, else 0 (equals MRR@k)."""
    r = np.asarray(ranks, dtype=np.float64)
    return np.where(r <= k, 1.0 / np.maximum(r, 1.0), 0.0)


def per_query_dcase2022(ranks, k_list: Sequence[int] = (1, 5, 10), map_k: int = 10) -> dict[str, np.ndarray]:
    """Per-query values for the DCASE 2022 metrics, ready for :func:`metrics_table`."""
    out = {f"R@{k}": recall_at_k(ranks, k) for k in k_list}
    out[f"mAP@{map_k}"] = map_at_k(ranks, map_k)
    return out


# ----------------------------------------------------------------------------------- multi-positive
def ap_at_k(ranked_relevance, n_relevant: int, k: int) -> float:
    """DCASE 2025 AP@k: sum of precision@i over relevant positions i <= k, / min(n_relevant, k).

    ``ranked_relevance`` is a boolean sequence in rank order (position 0 = rank 1).
    """
    if n_relevant < 1:
        raise ValueError("a query needs at least one relevant clip")
    rel = np.asarray(ranked_relevance, dtype=bool)[:k]
    hits = np.flatnonzero(rel)
    if hits.size == 0:
        return 0.0
    precision = np.arange(1, hits.size + 1, dtype=np.float64) / (hits + 1.0)
    return float(precision.sum() / min(n_relevant, k))


ap_at_k_multi = ap_at_k  # the name used in docs/architecture.md


def per_query_multi(scores, relevant_sets: Sequence[Iterable[int]], k: int = 10,
                    k_list: Sequence[int] = (1, 5, 10)) -> dict[str, np.ndarray]:
    """Per-query mAP@k (DCASE 2025 AP) and R@k (any relevant clip in the top k) with several positives.

    ``relevant_sets[q]`` are column indices of the clips relevant to query q (duplicates ignored). Ranks
    use the same stable tie-breaking as :func:`ranks_single`.
    """
    s = _check_scores(scores)
    if len(relevant_sets) != s.shape[0]:
        raise ValueError(f"need one relevant set per query ({s.shape[0]}), got {len(relevant_sets)}")
    n_clips = s.shape[1]
    recalls = {kk: np.zeros(s.shape[0]) for kk in k_list}
    ap = np.zeros(s.shape[0])
    for q, rel in enumerate(relevant_sets):
        idx = np.unique(np.fromiter(rel, dtype=np.int64))
        if idx.size == 0:
            raise ValueError(f"query {q} has no relevant clip")
        if idx.min() < 0 or idx.max() >= n_clips:
            raise ValueError(f"query {q}: relevant clip index out of range 0..{n_clips - 1}")
        row = s[q]
        t = row[idx][:, None]
        tied_before = (row[None, :] == t) & (np.arange(n_clips)[None, :] < idx[:, None])
        ranks = 1 + (row[None, :] > t).sum(axis=1) + tied_before.sum(axis=1)
        ranks = np.sort(ranks)
        for kk in k_list:
            recalls[kk][q] = float(ranks[0] <= kk)
        within = ranks[ranks <= k].astype(np.float64)
        if within.size:
            ap[q] = (np.arange(1, within.size + 1) / within).sum() / min(idx.size, k)
    out = {f"R@{kk}": recalls[kk] for kk in k_list}
    out[f"mAP@{k}"] = ap
    return out


# ----------------------------------------------------------------------------------------- jackknife
@dataclass(frozen=True)
class JackknifeResult:
    estimate: float  # bias-corrected: mean - bias (what the official script prints)
    bias: float
    std_err: float
    ci_low: float
    ci_high: float
    mean: float  # the plain mean
    n: int


def z_score(confidence: float = 0.95) -> float:
    """sqrt(2) * erfinv(confidence); exact constant for 0.95, scipy (or the stdlib) otherwise."""
    if confidence == 0.95:
        return Z_95
    if not 0.0 < confidence < 1.0:
        raise ValueError("confidence must be in (0, 1)")
    try:
        from scipy.special import erfinv
        return float(np.sqrt(2.0) * erfinv(confidence))
    except ImportError:  # pragma: no cover - scipy is optional
        from statistics import NormalDist
        return NormalDist().inv_cdf((1.0 + confidence) / 2.0)


def jackknife(values, confidence: float = 0.95) -> JackknifeResult:
    """Jackknife of the mean, operation for operation as ``astropy.stats.jackknife.jackknife_stats``.

    The leave-one-out means are computed with ``np.mean`` over each (n-1)-element resample, like astropy,
    so the estimate carries the same floating-point noise (bias ~1e-14) as the official numbers. With a
    single value the standard error is undefined (NaN).
    """
    x = np.asarray(values, dtype=np.float64).ravel()
    n = x.size
    if n == 0:
        raise ValueError("jackknife needs at least one value")
    stat = np.mean(x)
    if n == 1:
        v = float(stat)
        return JackknifeResult(v, 0.0, math.nan, math.nan, math.nan, v, 1)
    z = z_score(confidence)
    jack = np.empty(n)
    for a in range(0, n, 256):  # blocks of leave-one-out resamples, row i drops element i
        b = min(n, a + 256)
        mask = np.ones((b - a, n), dtype=bool)
        mask[np.arange(b - a), np.arange(a, b)] = False
        jack[a:b] = np.mean(np.broadcast_to(x, (b - a, n))[mask].reshape(b - a, n - 1), axis=1)
    mean_jack = np.mean(jack, axis=0)
    bias = (n - 1) * (mean_jack - stat)
    std_err = np.sqrt((n - 1) * np.mean((jack - mean_jack * np.ones(jack.shape)) ** 2, axis=0))
    estimate = stat - bias
    return JackknifeResult(float(estimate), float(bias), float(std_err), float(estimate - z * std_err),
                           float(estimate + z * std_err), float(stat), n)


def metrics_table(per_query: Mapping[str, Sequence[float]], confidence: float = 0.95) -> dict[str, dict]:
    """{"R@1": {"value", "ci_low", "ci_high", "std_err", "mean", "n"}, ...}; value = jackknife estimate."""
    table = {}
    for name, vals in per_query.items():
        j = jackknife(vals, confidence)
        table[name] = {"value": j.estimate, "ci_low": j.ci_low, "ci_high": j.ci_high,
                       "std_err": j.std_err, "mean": j.mean, "n": j.n}
    return table


# ------------------------------------------------------------------------------------- submissions
def write_submission(path, rows: Iterable[tuple[str, Sequence[str]]]) -> Path:
    """Write a DCASE submission CSV (``caption,file_name_1..file_name_10``), atomically.

    Rows with fewer than 10 files (tiny candidate sets) are padded with empty cells.
    """
    path = Path(path)
    with atomic_open(path, "w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh, quoting=csv.QUOTE_MINIMAL, lineterminator="\n")
        w.writerow(SUBMISSION_HEADER)
        for caption, files in rows:
            files = list(files)
            if len(files) > SUBMISSION_TOP_K:
                raise ValueError(f"at most {SUBMISSION_TOP_K} files per caption, got {len(files)}")
            w.writerow([caption] + files + [""] * (SUBMISSION_TOP_K - len(files)))
    return path


def _read_csv_rows(path: Path) -> list[list[str]]:
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise DataError("file not found", path=path, fix="check the path") from None
    except UnicodeDecodeError as e:
        raise DataError(f"not UTF-8 ({e.reason} at byte {e.start})", path=path,
                        fix="save the CSV as UTF-8") from None
    rows = [r for r in csv.reader(io.StringIO(text, newline="")) if r]
    if not rows:
        raise DataError("the CSV is empty", path=path)
    return rows


def read_submission(path) -> list[tuple[str, list[str]]]:
    """Rows of a submission CSV in file order: (caption, [file_name_1, ...]) (empty cells dropped)."""
    path = Path(path)
    rows = _read_csv_rows(path)
    header = [c.strip().lower() for c in rows[0]]
    if len(header) < 2 or header[0] != "caption":
        raise DataError(f"unexpected columns {rows[0]}", path=path,
                        fix=f"a submission has the columns {','.join(SUBMISSION_HEADER)}")
    return [(r[0], [f for f in r[1:] if f != ""]) for r in rows[1:]]


def _gt_caption_map(path: Path) -> tuple[dict[str, str], list[str]]:
    """caption -> file like the official load_clotho_csv (later duplicates overwrite; first position kept)."""
    rows = _read_csv_rows(path)
    header = [c.strip().lower() for c in rows[0]]
    if not header or header[0] != "file_name" or not any(h.startswith("caption") for h in header[1:]):
        raise DataError(f"unexpected columns {rows[0]}", path=path,
                        fix="a ground-truth CSV has the columns file_name,caption_1..caption_5")
    cap2file: dict[str, str] = {}
    notes: list[str] = []
    for i, r in enumerate(rows[1:], start=2):
        for cap in r[1:]:
            if cap == "":
                notes.append(f"line {i} ({r[0]}): empty caption ignored")
                continue
            if cap in cap2file and cap2file[cap] != r[0]:
                notes.append(f"line {i}: caption {cap!r} also belongs to {cap2file[cap]!r}; "
                             f"the later file ({r[0]!r}) is scored, as in the official script")
            cap2file[cap] = r[0]
    return cap2file, notes


@dataclass
class SubmissionScore:
    table: dict[str, dict]
    per_query: dict[str, np.ndarray]
    captions: list[str]  # GT order
    missing: list[str] = field(default_factory=list)  # GT captions absent from the submission
    notes: list[str] = field(default_factory=list)


def score_submission_details(gt_csv, sub_csv, confidence: float = 0.95) -> SubmissionScore:
    """Score a submission exactly like the official DCASE 2022 ``eval_script.py``.

    Semantics kept from the official script: queries are the GT captions in GT order (a dict, so a
    caption repeated in the GT is one query scored against the *last* file that lists it); a caption
    repeated in the submission uses its *last* row; R@k = number of top-k entries equal to the GT file
    (it can exceed 1 if a file is listed twice) and mAP@10 = sum over hits of hit_count / position.
    Unlike the official script (which raises KeyError), a GT caption missing from the submission
    counts as a miss (0 for every metric) and is listed in ``missing``.
    """
    gt_csv, sub_csv = Path(gt_csv), Path(sub_csv)
    cap2file, notes = _gt_caption_map(gt_csv)
    preds: dict[str, list[str]] = {}
    for cap, files in read_submission(sub_csv):
        if cap in preds:
            notes.append(f"submission lists caption {cap!r} twice; the last row is used")
        preds[cap] = files
    vals = {n: np.zeros(len(cap2file)) for n in METRIC_NAMES}
    missing = []
    positions_all = np.arange(1, SUBMISSION_TOP_K + 1, dtype=float)
    for i, (cap, gt_file) in enumerate(cap2file.items()):
        if cap not in preds:
            missing.append(cap)
            continue
        hits = np.asarray([gt_file == f for f in preds[cap]], dtype=bool)
        vals["R@1"][i] = np.sum(hits[:1], dtype=float)
        vals["R@5"][i] = np.sum(hits[:5], dtype=float)
        vals["R@10"][i] = np.sum(hits[:10], dtype=float)
        pos = positions_all[:len(hits[:10])][hits[:10]]
        if pos.size:
            vals["mAP@10"][i] = np.sum(np.arange(1, pos.size + 1, dtype=float) / pos, dtype=float)
    if missing:
        notes.append(f"{len(missing)} of {len(cap2file)} GT captions are missing from {sub_csv} "
                     f"and count as misses (first: {missing[0]!r})")
    return SubmissionScore(metrics_table(vals, confidence), vals, list(cap2file), missing, notes)


def score_submission(gt_csv, sub_csv, confidence: float = 0.95) -> dict[str, dict]:
    """Metrics table of a submission (see :func:`score_submission_details`); warns about missing captions."""
    res = score_submission_details(gt_csv, sub_csv, confidence)
    if res.missing:
        warnings.warn(f"{sub_csv}: {len(res.missing)} GT captions missing from the submission, counted "
                      "as misses", stacklevel=2)
    return res.table


# ------------------------------------------------------------------------------------ results table
def jsonable(v):
    """NaN/inf -> None, numpy scalars -> Python numbers, recursively (for json.dumps)."""
    if isinstance(v, dict):
        return {k: jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [jsonable(x) for x in v]
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _fmt(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.3f}"


def results_table(runs: Mapping[str, Mapping[str, Mapping]]) -> tuple[str, dict]:
    """Compare runs: (Markdown table "value [ci_low, ci_high]" per metric, JSON-able dict of the same).

    Columns are the metrics in order of first appearance across runs; a run lacking one shows "—".
    """
    cols: list[str] = []
    for m in runs.values():
        for name, v in m.items():
            if isinstance(v, Mapping) and "value" in v and name not in cols:
                cols.append(name)
    lines = ["| run | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for run, m in runs.items():
        cells = []
        for c in cols:
            v = m.get(c)
            if v is None:
                cells.append("—")
            elif "ci_low" in v:
                cells.append(f"{_fmt(v['value'])} [{_fmt(v['ci_low'])}, {_fmt(v['ci_high'])}]")
            else:
                cells.append(_fmt(v["value"]))
        lines.append(f"| {run} | " + " | ".join(cells) + " |")
    data = {"metrics": cols, "runs": {run: {c: jsonable(dict(m[c])) for c in cols if c in m}
                                      for run, m in runs.items()}}
    return "\n".join(lines) + "\n", data
