"""The demo end to end on a smaller synthetic corpus: what `make demo` shows a user."""

from __future__ import annotations

import json

import numpy as np
import pytest

from atae.data.synthetic import concept_of


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    from atae.demo import run_demo

    out = tmp_path_factory.mktemp("demo")
    lines: list[str] = []
    res = run_demo(out, seed=3, clips_per_concept=5, max_epochs=40, progress=False, log=lines.append)
    return res, out, lines


def _chance_map10(n_clips: int) -> float:
    # one relevant clip at a uniformly random rank: E[1/rank; rank <= 10]
    return sum(1.0 / r for r in range(1, min(10, n_clips) + 1)) / n_clips


@pytest.mark.slow
def test_demo_metrics_are_well_formed_and_far_above_chance(demo_run):
    res, out, lines = demo_run
    saved = json.loads((out / "metrics.json").read_text())
    assert set(saved) >= {"R@1", "R@5", "R@10", "mAP@10"}
    for name in ("R@1", "R@5", "R@10", "mAP@10"):
        m = saved[name]
        assert m["ci_low"] <= m["value"] <= m["ci_high"]
    n_test = sum(1 for _ in (out / "corpus").rglob("*.wav")) // 5  # 1 of 5 clips per concept is test
    assert saved["mAP@10"]["value"] > 3 * _chance_map10(n_test)
    assert any("R@10" in ln for ln in lines)


@pytest.mark.slow
def test_demo_example_queries_find_their_concept(demo_run):
    res, out, _ = demo_run
    answers = json.loads((out / "queries.json").read_text())
    assert len(answers) == 3
    expected = {"siren", "birds", "clock"}  # the concepts the three paraphrased queries describe
    top1 = {concept_of(hits[0][0]) for hits in answers.values()}
    assert len(top1 & expected) >= 2
    for hits in answers.values():
        scores = [s for _, s in hits]
        assert scores == sorted(scores, reverse=True) and len(hits) == 5


@pytest.mark.slow
def test_demo_model_reloads_with_identical_scores(demo_run):
    from atae.evaluate import score_matrix
    from atae.features import FeatureStore
    from atae.model import AlignedModel
    from atae.towers.registry import get_text_tower

    res, out, _ = demo_run
    model = AlignedModel.load(out / "run")
    table = FeatureStore(out / "features").audio_table(model.audio_info)
    query = list(res.queries)[0]
    keys = [k for k, _ in res.queries[query]]
    seq = get_text_tower(res.towers[1]).encode([query])
    scores = score_matrix(model, table, keys, seq)[0]
    np.testing.assert_allclose(scores, [s for _, s in res.queries[query]], atol=1e-5)


@pytest.mark.slow
def test_demo_ends_with_commands_that_index_and_serve(demo_run, monkeypatch):
    """The two printed commands work as printed, and the page they open finds the demo's sounds."""
    import shlex

    from click.testing import CliRunner
    from fastapi.testclient import TestClient

    from atae.cli import main
    from atae.data.synthetic import EXAMPLE_QUERIES
    from atae.library import Library
    from atae.server.app import create_app

    res, out, lines = demo_run
    index_cmd = next(ln for ln in lines if ln.strip().startswith("atae index"))
    serve_cmd = next(ln for ln in lines if ln.strip().startswith("atae serve"))
    assert lines.index(serve_cmd) == lines.index(index_cmd) + 1 and lines.index(index_cmd) > max(
        i for i, ln in enumerate(lines) if "mAP@10" in ln)
    r = CliRunner().invoke(main, shlex.split(index_cmd)[1:], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    db = shlex.split(serve_cmd)[shlex.split(serve_cmd).index("--db") + 1]
    with Library.open(db) as lib, TestClient(create_app(lib), base_url="http://127.0.0.1:8000") as client:
        n = client.get("/api/stats").json()["files"]
        assert n == sum(1 for _ in (out / "corpus" / "audio").glob("*.wav"))
        answers = [client.get("/api/search", params={"q": q, "k": 1}).json() for q in EXAMPLE_QUERIES]
        top = [concept_of(a["results"][0]["file_name"]) for a in answers]
        assert sum(a == b for a, b in zip(top, ["siren", "birds", "clock"], strict=True)) >= 2

    # `atae demo --serve` serves that library (the demo itself already ran above)
    served = []
    monkeypatch.setattr("atae.demo.run_demo", lambda *a, **kw: None)
    monkeypatch.setattr("atae.server.run.serve_library",
                        lambda lib, host, port, **kw: served.append((lib.stats()["files"], host, port)))
    r = CliRunner().invoke(main, ["demo", "--out", str(out), "--serve", "--port", "8765"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert served == [(n, "127.0.0.1", 8765)]
