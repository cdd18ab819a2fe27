"""ESC-50 -> Clotho-format captions from class names."""

from __future__ import annotations

import pytest

from atae.data import read_caption_csv
from atae.data.esc50 import caption_pool, captions_for, humanise, write_caption_csv
from atae.errors import DataError


def test_humanise_and_unknown_class():
    assert humanise("chirping_birds") == "chirping birds"
    pool = caption_pool("glass_harp")
    assert "The sound of glass harp" in pool and "Glass harp can be heard" in pool
    caps = captions_for("glass_harp", "1-2-A-99", seed=0)
    assert len(caps) == 5 == len(set(caps)) and set(caps) <= set(pool)
    assert "A dog barks" in caption_pool("dog")
    assert captions_for("dog", "k", seed=0) == captions_for("dog", "k", seed=0)


def _meta(tmp_path):
    meta = tmp_path / "esc50.csv"
    meta.write_text("filename,fold,target,category,esc10,src_file,take\n"
                    "1-1-A-0.wav,1,0,dog,True,1,A\n1-2-A-14.wav,1,14,chirping_birds,False,2,A\n"
                    "2-3-A-0.wav,2,0,dog,True,3,A\n4-4-A-0.wav,4,0,dog,True,4,A\n")
    audio = tmp_path / "audio"
    audio.mkdir()
    for stem in ("1-1-A-0", "1-2-A-14", "4-4-A-0"):
        (audio / f"{stem}.ogg").write_bytes(b"OggS")
    return meta, audio


def test_write_caption_csv_maps_wav_to_ogg(tmp_path):
    meta, audio = _meta(tmp_path)
    out = write_caption_csv(meta, audio, tmp_path / "out" / "train.csv", folds=[1, 2])
    ds = read_caption_csv(out, audio)
    assert ds.keys() == ["1-1-A-0.ogg", "1-2-A-14.ogg"]  # 2-3-A-0 has no audio: left out
    assert all(len(c.captions) == 5 for c in ds.clips) and ds.problems == []
    assert any("bird" in c.lower() for c in ds.clips[1].captions)
    with pytest.raises(DataError, match="folds"):
        write_caption_csv(meta, audio, tmp_path / "x.csv", folds=[3])


def test_real_esc50_folds(shared, tmp_path):
    esc = shared / "data" / "esc50"
    out = write_caption_csv(esc / "meta" / "esc50.csv", esc / "audio_16k", tmp_path / "f123.csv", [1, 2, 3])
    ds = read_caption_csv(out, esc / "audio_16k")
    assert len(ds) == 1200 and ds.problems == [] and all(len(c.captions) == 5 for c in ds.clips)
