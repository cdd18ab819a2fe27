"""FSD50K noisy pairs: expected texts written by hand from the real sample records."""

from __future__ import annotations

import hashlib
import json
import re

import pytest

from atae.data import read_fsd50k_noisy
from atae.data.fsd50k import clean_description, keep_clip
from atae.errors import DataError


@pytest.fixture
def sample(shared):
    return shared / "data" / "fsd50k" / "clips_info_sample.json"


def test_hand_checked_records(sample):
    ds = read_fsd50k_noisy(sample, fraction=1.0)
    by = {c.key: c.captions for c in ds.clips}
    assert len(by) == 13 and ds.problems == []
    # HTML link removed, entity-free text kept, "&" kept
    assert by["391870"][0] == "An excerpt of inchadney's Freesound #391215 tweaked & looped"
    # tags: one space, uploader's order, the repeated "phone" kept
    assert by["391870"][1] == ("inchadney phone loop public alert ring 1970s uk retro britain phone phonebox "
                               "ringtone telephone mobile convenience urine 1977 loopable 391215 remix")
    # CRLF -> one space
    assert by["400093"] == ["Recorded with: Zoom H4n Made in: Gorizia, Italy",
                            "platform brakes train railway station"]
    # long text: whitespace runs collapsed, cut at 500 characters
    long = by["395238"][0]
    assert long.startswith("Tearing papers with reverb. I used a Samson condenser microphone")
    assert long.endswith(" Netherlands on the 12 June 2017. If you use the sound, plea")
    assert len(long) == 500
    raw = json.loads(sample.read_text())["395238"]["description"]
    assert long == re.sub(r"\s+", " ", raw).strip()[:500]  # a second, regex-based route


def test_html_entities_and_block_tags():
    assert clean_description("a&amp;b<br>c &#39;d&#39;\t\t e<p>f</p>") == "a&b c 'd' e f"
    assert clean_description("x" * 600) == "x" * 500


def test_selection_rule_is_seeded_and_stable(sample, tmp_path):
    info = json.loads(sample.read_text())
    def u(k):
        return int(hashlib.sha256(f"0:{k}".encode()).hexdigest()[:16], 16) / 2**64

    expect = sorted(k for k in info if u(k) < 0.5)
    half = read_fsd50k_noisy(sample)
    assert half.keys() == sorted(expect, key=int)
    # removing other clips does not change the fate of the remaining ones
    sub = {k: info[k] for k in list(info)[:6]}
    p = tmp_path / "sub.json"
    p.write_text(json.dumps(sub))
    assert read_fsd50k_noisy(p).keys() == [k for k in half.keys() if k in sub]
    assert read_fsd50k_noisy(sample, fraction=0.0).keys() == []
    # over many ids the kept share is close to the fraction (10 binomial standard deviations)
    share = sum(keep_clip(str(i)) for i in range(10000)) / 10000
    assert 0.45 < share < 0.55
    assert [keep_clip(str(i), seed=1) for i in range(50)] != [keep_clip(str(i)) for i in range(50)]


def test_empty_texts_and_audio(tmp_path):
    info = {"1": {"description": "<b></b>", "tags": ["a", "b"]}, "2": {"description": "d", "tags": []},
            "3": {"description": "", "tags": []}}
    p = tmp_path / "info.json"
    p.write_text(json.dumps(info))
    ds = read_fsd50k_noisy(p, fraction=1.0)
    assert [(c.key, c.captions) for c in ds.clips] == [("1", ["a b"]), ("2", ["d"])]
    assert sum("clip 3" in x for x in ds.problems) == 2 and any("clip 1: empty description" in x
                                                                 for x in ds.problems)
    audio = tmp_path / "audio"
    audio.mkdir()
    (audio / "2.wav").write_bytes(b"RIFF")
    ds = read_fsd50k_noisy(p, audio, fraction=1.0)
    assert ds.keys() == ["2"] and ds.clips[0].path == audio / "2.wav"
    assert any("1.wav not found" in x for x in ds.problems)
    (audio / "2.wav").unlink()
    with pytest.raises(DataError, match="noisy-audio"):
        read_fsd50k_noisy(p, audio, fraction=1.0)


def test_bad_json(tmp_path):
    p = tmp_path / "x.json"
    p.write_text("{not json")
    with pytest.raises(DataError, match="x.json"):
        read_fsd50k_noisy(p)
