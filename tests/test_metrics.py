"""DCASE metrics: hand-computed cases, an analytic jackknife check, and the official golden fixture."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from atae.errors import DataError
from atae.metrics import (
    Z_95,
    ap_at_k,
    jackknife,
    metrics_table,
    per_query_dcase2022,
    per_query_multi,
    ranks_single,
    read_submission,
    results_table,
    score_submission,
    score_submission_details,
    write_submission,
)


def test_ranks_single_by_hand_with_ties():
    scores = np.array([
        [0.9, 0.1, 0.5, 0.3],   # relevant 0 -> rank 1
        [0.9, 0.1, 0.5, 0.3],   # relevant 3 -> 0.9, 0.5 above -> rank 3
        [0.5, 0.5, 0.5, 0.5],   # all tied, relevant 2 -> clips 0 and 1 come first -> rank 3
        [0.2, 0.7, 0.7, 0.1],   # relevant 1 tied with clip 2 (later) -> rank 1
    ])
    assert ranks_single(scores, [0, 3, 2, 1]).tolist() == [1, 3, 3, 1]


def test_ranks_single_matches_stable_argsort():
    rng = np.random.default_rng(0)
    scores = np.round(rng.random((50, 30)), 1)  # many ties
    rel = rng.integers(0, 30, 50)
    order = np.argsort(-scores, axis=1, kind="stable")
    expected = [int(np.flatnonzero(order[q] == rel[q])[0]) + 1 for q in range(50)]
    assert ranks_single(scores, rel).tolist() == expected


def test_ranks_single_rejects_nan_and_bad_index():
    with pytest.raises(ValueError):
        ranks_single(np.array([[np.nan, 1.0]]), [0])
    with pytest.raises(ValueError):
        ranks_single(np.ones((1, 2)), [2])


def test_per_query_dcase2022_four_queries_by_hand():
    pq = per_query_dcase2022(np.array([1, 3, 7, 12]))
    assert pq["R@1"].tolist() == [1, 0, 0, 0]
    assert pq["R@5"].tolist() == [1, 1, 0, 0]
    assert pq["R@10"].tolist() == [1, 1, 1, 0]
    assert pq["mAP@10"].tolist() == pytest.approx([1.0, 1 / 3, 1 / 7, 0.0])


def test_jackknife_of_mean_is_mean_and_standard_error():
    # For the mean, the jackknife estimate is the mean and std_err = sample std (ddof=1) / sqrt(n).
    vals = [1.0, 0.0, 0.0, 1.0]
    j = jackknife(vals)
    se = math.sqrt((4 * 0.25 / 3) / 4)  # deviations +-0.5 -> var_ddof1 = 1/3
    assert j.estimate == pytest.approx(0.5, abs=1e-15)
    assert j.std_err == pytest.approx(se, abs=1e-15)
    assert (j.ci_low, j.ci_high) == pytest.approx((0.5 - 1.959964 * se, 0.5 + 1.959964 * se), abs=1e-6)
    x = np.random.default_rng(1).random(777)
    j = jackknife(x)
    assert j.estimate == pytest.approx(x.mean(), abs=1e-12)
    assert j.std_err == pytest.approx(x.std(ddof=1) / math.sqrt(x.size), rel=1e-10)


def test_z_constant_matches_scipy():
    special = pytest.importorskip("scipy.special")
    assert Z_95 == pytest.approx(math.sqrt(2) * special.erfinv(0.95), abs=1e-15)


def test_jackknife_single_value_has_undefined_error():
    j = jackknife([0.25])
    assert j.estimate == 0.25 and math.isnan(j.std_err)


def test_ap_at_k_by_hand():
    # hits at ranks 1 and 3 of 3 relevant: (1/1 + 2/3) / 3
    assert ap_at_k([1, 0, 1, 0, 0], n_relevant=3, k=5) == pytest.approx((1 + 2 / 3) / 3)
    # 20 relevant, capped at k=10: hits at 2 and 10 -> (1/2 + 2/10) / 10
    rel = [0] * 10
    rel[1] = rel[9] = 1
    assert ap_at_k(rel, n_relevant=20, k=10) == pytest.approx((0.5 + 0.2) / 10)
    assert ap_at_k([0, 0, 1], n_relevant=1, k=2) == 0.0


def test_per_query_multi_matches_sorted_relevance():
    rng = np.random.default_rng(3)
    scores = np.round(rng.random((20, 40)), 2)
    sets = [set(rng.choice(40, rng.integers(1, 6), replace=False).tolist()) for _ in range(20)]
    out = per_query_multi(scores, sets, k=10)
    for q in range(20):
        order = np.argsort(-scores[q], kind="stable")
        relevance = [int(c in sets[q]) for c in order]
        assert out["mAP@10"][q] == pytest.approx(ap_at_k(relevance, len(sets[q]), 10))
        for k in (1, 5, 10):
            assert out[f"R@{k}"][q] == float(any(relevance[:k]))


def test_submission_roundtrip_and_missing_caption(tmp_path):
    gt = tmp_path / "gt.csv"
    with gt.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["file_name", "caption_1", "caption_2"])
        w.writerow(["a, b.wav", "dog barks, loudly", "a dog"])
        w.writerow(["c.wav", "rain \"falls\"", "wind"])
    sub = tmp_path / "sub.csv"
    others = [f"x{i}.wav" for i in range(9)]
    write_submission(sub, [("dog barks, loudly", ["a, b.wav"] + others),
                           ("a dog", others[:2] + ["a, b.wav"] + others[2:]),
                           ("rain \"falls\"", others + ["c.wav"])])
    rows = read_submission(sub)
    assert rows[0] == ("dog barks, loudly", ["a, b.wav"] + others)
    with pytest.warns(UserWarning, match="missing"):
        table = score_submission(gt, sub)
    res = score_submission_details(gt, sub)
    assert res.missing == ["wind"]
    assert res.per_query["R@1"].tolist() == [1, 0, 0, 0]
    assert res.per_query["R@5"].tolist() == [1, 1, 0, 0]
    assert res.per_query["R@10"].tolist() == [1, 1, 1, 0]
    assert res.per_query["mAP@10"].tolist() == pytest.approx([1, 1 / 3, 1 / 10, 0])
    assert table["mAP@10"]["value"] == pytest.approx((1 + 1 / 3 + 1 / 10) / 4)


def test_duplicate_gt_caption_uses_last_file_like_official(tmp_path):
    gt = tmp_path / "gt.csv"
    gt.write_text("file_name,caption_1\na.wav,same words\nb.wav,same words\n")
    sub = tmp_path / "sub.csv"
    write_submission(sub, [("same words", ["b.wav"])])
    res = score_submission_details(gt, sub)
    assert res.captions == ["same words"] and res.per_query["R@1"].tolist() == [1.0]
    assert any("also belongs" in n for n in res.notes)


def test_bad_submission_header(tmp_path):
    sub = tmp_path / "sub.csv"
    sub.write_text("query,f1\nx,y\n")
    with pytest.raises(DataError, match="sub.csv"):
        read_submission(sub)


def test_results_table_markdown_and_json():
    t = metrics_table({"R@1": [1.0, 0.0, 0.0, 1.0], "mAP@10": [1.0, 0.5, 0.0, 0.25]})
    md, data = results_table({"runA": t, "runB": {"R@1": t["R@1"]}})
    lines = md.strip().splitlines()
    assert lines[0] == "| run | R@1 | mAP@10 |"
    assert lines[2].startswith("| runA | 0.500 [") and "0.438" in lines[2]
    assert lines[3].endswith("| — |")
    json.dumps(data)
    assert data["runs"]["runA"]["R@1"]["value"] == pytest.approx(0.5)


@pytest.mark.golden
def test_official_dcase2022_golden(shared):
    g = shared / "golden" / "dcase_metrics"
    expected = json.loads((g / "expected.json").read_text())
    res = score_submission_details(g / "gt.csv", g / "submission.csv")
    names = {"R1": "R@1", "R5": "R@5", "R10": "R@10", "mAP10": "mAP@10"}
    for off, ours in names.items():
        e, m = expected["metrics"][off], res.table[ours]
        assert res.per_query[ours].tolist() == e["per_query"]
        assert abs(m["value"] - e["estimate"]) <= 1e-12
        assert abs(m["ci_low"] - e["ci95"][0]) <= 1e-12
        assert abs(m["ci_high"] - e["ci95"][1]) <= 1e-12
        assert abs(m["std_err"] - e["std_err"]) <= 1e-12
    # second route: the per-query values follow from the recorded design ranks (0 = absent)
    ranks = np.array(expected["target_rank_design"]["per_query_rank_0_means_absent"])
    pq = per_query_dcase2022(np.where(ranks == 0, 11, ranks))
    for off, ours in names.items():
        assert pq[ours].tolist() == expected["metrics"][off]["per_query"]
    t = res.table
    printed = [f"{o} {t[n]['value']:.2f} [{t[n]['ci_low']:.2f}, {t[n]['ci_high']:.2f}]"
               for o, n in names.items()]
    assert printed == expected["official_printed_output"]


@pytest.mark.golden
def test_cli_score_prints_official_lines_and_writes_json(shared, tmp_path):
    from click.testing import CliRunner

    from atae.cli.score import score

    g = shared / "golden" / "dcase_metrics"
    out = tmp_path / "m.json"
    r = CliRunner().invoke(score, [str(g / "gt.csv"), str(g / "submission.csv"), "--json", str(out)])
    assert r.exit_code == 0, r.output
    expected = json.loads((g / "expected.json").read_text())
    for line in expected["official_printed_output"]:
        name, rest = line.split(" ", 1)
        assert any(o.split()[0] == name and rest in o for o in r.output.splitlines())
    data = json.loads(out.read_text())
    assert set(data["R@1"]) >= {"value", "ci_low", "ci_high"}
    assert data["mAP@10"]["value"] == pytest.approx(expected["metrics"]["mAP10"]["estimate"], abs=1e-12)
