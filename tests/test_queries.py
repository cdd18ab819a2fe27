"""DCASE 2025 multi-positive query files."""

from __future__ import annotations

import pytest

from atae.data import read_queries_csv
from atae.errors import DataError


def test_real_dcase2025_query_file(shared):
    qs = read_queries_csv(shared / "data" / "clotho" / "dcase2025_task6" / "metadata_eval.csv")
    assert len(qs) == 1037
    assert qs[0].text == "A Bicycle rides past people walking, while birds are singing."
    assert qs[0].relevant == ["bird_in_rain.wav", "woodsbirds.wav", "Stream Honiton.wav", "bridge.wav"]
    babbling = next(q for q in qs if q.text == "A babbling brook full of water is gushing past.")
    assert "Pensol - le Moulin cours d&#39;eau.wav" in babbling.relevant  # entities kept as written
    assert max(len(q.relevant) for q in qs) == 12 and min(len(q.relevant) for q in qs) == 1


@pytest.mark.parametrize("cell", ["not a list", "['a.wav', 3]", "[]", "__import__('os')"])
def test_malformed_rows_name_file_and_line(tmp_path, cell):
    p = tmp_path / "q.csv"
    p.write_text(f'query,audio_filenames\nok,"[\'x.wav\']"\nbad,"{cell}"\n')
    with pytest.raises(DataError, match=r"q\.csv.*line 3"):
        read_queries_csv(p)


def test_missing_column(tmp_path):
    p = tmp_path / "q.csv"
    p.write_text("query,files\na,b\n")
    with pytest.raises(DataError, match="audio_filenames"):
        read_queries_csv(p)
