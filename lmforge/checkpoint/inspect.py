"""Describe a checkpoint without loading its weights: architecture, size, tensor types."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np


def describe(path: str | Path) -> dict[str, Any]:
    """A flat summary for `lmforge info`: reads only headers and metadata."""
    path = Path(path)
    return _describe_hf(path) if path.is_dir() else _describe_gguf(path)


def _describe_gguf(path: Path) -> dict[str, Any]:
    from lmforge.checkpoint.gguf import config_from_gguf, open_gguf, tensor_types

    gf = open_gguf(path)
    config = config_from_gguf(gf, name=path.stem)
    meta = gf.metadata
    n_params = sum(int(np.prod(t.shape)) for t in gf.tensors)
    return {
        "file": str(path),
        "format": f"GGUF v{gf.version}",
        "size": f"{path.stat().st_size / 2**20:.1f} MiB",
        "name": meta.get("general.name", path.stem),
        **_summary(config, n_params),
        "tensor types": ", ".join(f"{k} x{v}" for k, v in sorted(tensor_types(gf).items())),
        "tokenizer": meta.get("tokenizer.ggml.model", "-"),
        "chat template": "yes" if "tokenizer.chat_template" in meta else "no (built-in fallback)",
    }


def _describe_hf(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    from lmforge.checkpoint.hf import _safetensor_files, config_from_hf

    config = config_from_hf(path)
    n_params, dtypes = 0, {}
    for file in _safetensor_files(path):
        with safe_open(file, "pt") as f:
            for key in f.keys():
                piece = f.get_slice(key)
                n_params += int(np.prod(piece.get_shape()))
                dtypes[piece.get_dtype()] = dtypes.get(piece.get_dtype(), 0) + 1
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    tokenizer_cfg = path / "tokenizer_config.json"
    has_template = tokenizer_cfg.is_file() and "chat_template" in json.loads(tokenizer_cfg.read_text())
    return {
        "file": str(path), "format": "Hugging Face (safetensors)", "size": f"{size / 2**20:.1f} MiB",
        "name": path.name, **_summary(config, n_params),
        "tensor types": ", ".join(f"{k} x{v}" for k, v in sorted(dtypes.items())),
        "chat template": "yes" if has_template or (path / "chat_template.jinja").is_file() else "no",
    }


def _summary(config, n_params: int) -> dict[str, Any]:
    kinds = sorted(set(config.layer_types))
    attention = "MHA" if config.n_kv_head == config.n_head else "MQA" if config.n_kv_head == 1 else "GQA"
    return {
        "architecture": f"{config.norm} + {config.mlp} + {config.position} positions",
        "parameters": f"{n_params / 1e6:.1f} M",
        "layers": config.n_layer,
        "width": config.n_embd,
        "attention": f"{attention}: {config.n_head} query heads, {config.n_kv_head} kv heads, head dim "
                     f"{config.head_dim}, layers {'/'.join(kinds)}"
                     + (f" (window {config.sliding_window})" if config.sliding_window else ""),
        "context length": config.block_size,
        "vocabulary": config.vocab_size,
        "tied embeddings": config.tie_embeddings,
    }
