"""Training checkpoints: safetensors + JSON (never pickle), written atomically, best/last kept.

A checkpoint is a folder `step-000120/` holding trainable.safetensors (the trained tensors),
optimizer.safetensors (its state flattened to tensors, RNG state included) and state.json
(step, data position, Python RNG, eval loss). It is written under a temporary name and
renamed into place, and `index.json` (itself replaced atomically) names the last and the
best; a kill at any instant leaves either the old checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lmforge.atomic import atomic_write_json
from lmforge.data.io import read_json

INDEX = "index.json"


@dataclass
class Checkpoint:
    """What one checkpoint holds, loaded."""

    path: Path
    trainable: dict[str, torch.Tensor]
    optimizer: dict[str, torch.Tensor]
    state: dict


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save_tensors(tensors: dict[str, torch.Tensor], file: Path) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(file))
    with open(file, "rb") as f:
        os.fsync(f.fileno())


def save_checkpoint(root: Path, step: int, trainable: dict[str, torch.Tensor], optimizer: dict[str, torch.Tensor],
                    state: dict, eval_loss: float | None, keep: int = 1) -> Path:
    """Write checkpoint `step` atomically, update the index, prune all but last/best/`keep` newest."""
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:07d}"
    tmp = root / f".tmp-{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    _save_tensors(trainable, tmp / "trainable.safetensors")
    _save_tensors(optimizer, tmp / "optimizer.safetensors")
    atomic_write_json(tmp / "state.json", {**state, "step": step, "eval_loss": eval_loss})
    _fsync_dir(tmp)
    final = root / name
    shutil.rmtree(final, ignore_errors=True)  # a re-run of a step after resume
    os.replace(tmp, final)
    _fsync_dir(root)
    index = read_json(root / INDEX, {}) or {}
    history = [h for h in index.get("history", []) if h != name] + [name]
    best, best_loss = index.get("best"), index.get("best_loss")
    if eval_loss is not None and (best_loss is None or eval_loss < best_loss):
        best, best_loss = name, eval_loss
    keep_names = set(history[-max(1, keep):]) | {best} if best else set(history[-max(1, keep):])
    atomic_write_json(root / INDEX, {"last": name, "best": best, "best_loss": best_loss,
                                     "history": [h for h in history if h in keep_names]})
    for old in history:
        if old not in keep_names:
            shutil.rmtree(root / old, ignore_errors=True)
    return final


def read_index(root: Path) -> dict:
    return read_json(root / INDEX, {}) or {}


def load_checkpoint(path: Path) -> Checkpoint:
    """One checkpoint folder, loaded (tensors from safetensors, state from JSON)."""
    if not (path / "state.json").is_file():
        raise ValueError(f"{path} is not a checkpoint (no state.json)")
    return Checkpoint(path, load_file(str(path / "trainable.safetensors")),
                      load_file(str(path / "optimizer.safetensors")), json.loads((path / "state.json").read_text()))


def latest_checkpoint(root: Path) -> Checkpoint | None:
    """The last complete checkpoint under `root` (leftover temporary folders are removed)."""
    if not root.is_dir():
        return None
    for tmp in root.glob(".tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)
    last = read_index(root).get("last")
    return load_checkpoint(root / last) if last else None


def average_checkpoints(paths: list[Path]) -> dict[str, torch.Tensor]:
    """Element-wise mean of the trainable tensors of several checkpoints (weight averaging)."""
    if not paths:
        raise ValueError("average_checkpoints needs at least one checkpoint")
    total: dict[str, torch.Tensor] = {}
    for path in paths:
        for k, v in load_file(str(path / "trainable.safetensors")).items():
            total[k] = total[k] + v.double() if k in total else v.double()
    return {k: (v / len(paths)).float() for k, v in total.items()}


def rng_tensors() -> dict[str, torch.Tensor]:
    """The torch RNG state(s) as tensors for the optimizer file."""
    out = {"rng::torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["rng::cuda"] = torch.cuda.get_rng_state()
    return out


def restore_rng(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["rng::torch"])
    if "rng::cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng::cuda"])


def restore_trained(ckpt: Checkpoint, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copy the checkpoint's trained tensors into `params` (every one must be there), restore the RNG
    and return its optimizer tensors (the RNG entries left out) for `optim.load_optimizer_tensors`."""
    missing = set(params) - set(ckpt.trainable)
    if missing:
        raise ValueError(f"{ckpt.path}: checkpoint lacks {sorted(missing)[:3]}; it is from another model/adapter")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(ckpt.trainable[name])
    restore_rng(ckpt.optimizer)
    return {k: v for k, v in ckpt.optimizer.items() if not k.startswith("rng::")}
