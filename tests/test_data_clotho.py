"""Clotho-format caption CSVs and Clotho metadata: real caption files and generated bad-input folders."""

from __future__ import annotations

import csv

import pytest

from atae.data import read_caption_csv, read_clotho_metadata
from atae.errors import DataError


@pytest.mark.parametrize("split,n", [("development", 3839), ("validation", 1045), ("evaluation", 1045)])
def test_real_clotho_caption_files(shared, split, n):
    path = shared / "data" / "clotho" / f"clotho_captions_{split}.csv"
    ds = read_caption_csv(path, require_audio=False)
    assert len(ds) == n and ds.problems == []
    assert all(len(c.captions) == 5 and c.path is None for c in ds.clips)
    with path.open(encoding="utf-8", newline="") as fh:
        rows = list(csv.reader(fh))[1:]
    assert ds.keys() == [r[0] for r in rows]
    assert ds.captions()[:5] == [(c, rows[0][0]) for c in rows[0][1:]]
    assert ds.captions()[-1] == (rows[-1][5], rows[-1][0])  # captions kept exactly as written


def _write(path, text, encoding="utf-8"):
    path.write_bytes(text.encode(encoding))
    return path


def _touch(d, *names):
    d.mkdir(exist_ok=True)
    for n in names:
        (d / n).write_bytes(b"RIFF")
    return d


def test_colon_quirk_missing_audio_empty_caption_duplicate(tmp_path):
    audio = _touch(tmp_path / "audio", "rain_ police.wav", "b.wav", "c.wav")
    csv_path = _write(tmp_path / "caps.csv", (
        "file_name,caption_1,caption_2\n"
        "rain: police.wav,rain falls,sirens wail\n"
        "b.wav,a dog barks,\n"
        "missing.wav,x,y\n"
        "b.wav,again,again\n"
        "c.wav,\"a, b\",c\n"))
    ds = read_caption_csv(csv_path, audio)
    assert ds.keys() == ["rain: police.wav", "b.wav", "c.wav"]
    assert ds.clips[0].path == audio / "rain_ police.wav"
    assert ds.clips[1].captions == ["a dog barks"]
    assert ds.clips[2].captions == ["a, b", "c"]
    joined = "\n".join(ds.problems)
    assert "line 3 (b.wav): caption_2 is empty" in joined
    assert "line 4: audio 'missing.wav' not found" in joined and "caps.csv" in joined
    assert "line 5: 'b.wav' is listed again" in joined
    assert len(ds.problems) == 3


def test_html_entity_file_names_resolve(tmp_path):
    audio = _touch(tmp_path / "audio", "cours d'eau.wav")
    p = _write(tmp_path / "c.csv", "file_name,caption_1\ncours d&#39;eau.wav,water\n")
    ds = read_caption_csv(p, audio)
    assert ds.clips[0].key == "cours d&#39;eau.wav" and ds.clips[0].path.name == "cours d'eau.wav"


def test_no_audio_at_all_is_an_error(tmp_path):
    audio = _touch(tmp_path / "audio")
    p = _write(tmp_path / "c.csv", "file_name,caption_1\na.wav,x\nb.wav,y\n")
    with pytest.raises(DataError, match="wrong --audio-dir"):
        read_caption_csv(p, audio)
    assert len(read_caption_csv(p, audio, require_audio=False)) == 2


def test_renamed_columns_name_file_found_and_expected(tmp_path):
    p = _write(tmp_path / "bad.csv", "filename,text\na.wav,x\n")
    with pytest.raises(DataError) as e:
        read_caption_csv(p, require_audio=False)
    msg = str(e.value)
    assert "bad.csv" in msg and "'filename'" in msg and "caption_1" in msg and "file_name" in msg


def test_header_case_spaces_bom_and_any_caption_count(tmp_path):
    p = _write(tmp_path / "c.csv", "\ufeff File_Name , CAPTION_2,caption_1\na.wav,second,first\n")
    ds = read_caption_csv(p, require_audio=False)
    assert ds.clips[0].captions == ["first", "second"] and ds.problems == []


def test_latin1_csv_is_read_with_a_warning(tmp_path):
    p = _write(tmp_path / "c.csv", "file_name,caption_1\ncafé.wav,un café bruyant\n", encoding="iso-8859-1")
    ds = read_caption_csv(p, require_audio=False)
    assert ds.clips[0].key == "café.wav" and ds.clips[0].captions == ["un café bruyant"]
    assert len(ds.problems) == 1 and "ISO-8859-1" in ds.problems[0] and "c.csv" in ds.problems[0]


def test_binary_and_empty_and_absent_files(tmp_path):
    with pytest.raises(DataError, match="binary"):
        read_caption_csv(_write(tmp_path / "x.csv", "RIFF\x00\x00WAVE"), require_audio=False)
    with pytest.raises(DataError, match="empty"):
        read_caption_csv(_write(tmp_path / "e.csv", ""), require_audio=False)
    with pytest.raises(DataError, match="not found"):
        read_caption_csv(tmp_path / "nope.csv", require_audio=False)
    with pytest.raises(DataError, match="audio-dir"):
        read_caption_csv(_write(tmp_path / "ok.csv", "file_name,caption_1\na.wav,x\n"))


def test_clotho_metadata_iso_8859_1(tmp_path):
    text = ("file_name,keywords,sound_id,sound_link,start_end_samples,manufacturer,license\n"
            "a: b.wav,pluie;café; rue ,123,https://freesound.org/s/123,\"[0, 10]\",Zoom,CC BY\n"
            "c.wav,bird,5,,,,\n")
    meta = read_clotho_metadata(_write(tmp_path / "meta.csv", text, encoding="iso-8859-1"))
    assert list(meta) == ["a: b.wav", "c.wav"]
    m = meta["a: b.wav"]
    assert m.keywords == ["pluie", "café", "rue"]
    assert (m.sound_id, m.start_end_samples, m.manufacturer, m.license) == ("123", "[0, 10]", "Zoom", "CC BY")
    with pytest.raises(DataError, match="keywords"):
        read_clotho_metadata(_write(tmp_path / "m2.csv", "file_name,tags\na.wav,x\n"))


def test_latin1_control_like_bytes_do_not_split_rows(tmp_path):
    # 0x85 decodes to U+0085 (NEL) in ISO-8859-1: it must stay inside its field, not start a new row
    p = tmp_path / "c.csv"
    p.write_bytes(b"file_name,caption_1\r\na.wav,\"dots\x85 and,comma\"\r\nb.wav,two\r\n")
    ds = read_caption_csv(p, require_audio=False)
    assert ds.keys() == ["a.wav", "b.wav"] and ds.clips[0].captions == ["dots\x85 and,comma"]
