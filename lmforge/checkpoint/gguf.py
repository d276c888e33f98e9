"""Read GGUF checkpoints (llama.cpp's format) through the `gguf` library.

The header is checked before the library parses it, every tensor is checked against the
file size and the model's expected shape, and each quantized tensor is dequantized to
fp32 with `gguf.quants.dequantize`. Names map through one declarative table.
"""

from __future__ import annotations

import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize

from lmforge.checkpoint.errors import CheckpointError
from lmforge.config import GEMMA3_STYLE, GPT2_STYLE, LLAMA_STYLE, Config

MAX_TENSORS = 100_000
MAX_KV = 100_000
MAX_ELEMENTS = 1 << 36

# GGUF name -> Hugging Face name; "{}" is the layer index.
GGUF_NAMES: dict[str, str] = {
    "token_embd.weight": "model.embed_tokens.weight",
    "position_embd.weight": "model.embed_positions.weight",
    "output_norm.weight": "model.norm.weight",
    "output_norm.bias": "model.norm.bias",
    "output.weight": "lm_head.weight",
    "blk.{}.attn_norm.weight": "model.layers.{}.input_layernorm.weight",
    "blk.{}.attn_norm.bias": "model.layers.{}.input_layernorm.bias",
    "blk.{}.attn_q.weight": "model.layers.{}.self_attn.q_proj.weight",
    "blk.{}.attn_k.weight": "model.layers.{}.self_attn.k_proj.weight",
    "blk.{}.attn_v.weight": "model.layers.{}.self_attn.v_proj.weight",
    "blk.{}.attn_output.weight": "model.layers.{}.self_attn.o_proj.weight",
    "blk.{}.attn_output.bias": "model.layers.{}.self_attn.o_proj.bias",
    "blk.{}.attn_q_norm.weight": "model.layers.{}.self_attn.q_norm.weight",
    "blk.{}.attn_k_norm.weight": "model.layers.{}.self_attn.k_norm.weight",
    "blk.{}.ffn_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "blk.{}.ffn_norm.bias": "model.layers.{}.post_attention_layernorm.bias",
    "blk.{}.ffn_gate.weight": "model.layers.{}.mlp.gate_proj.weight",
    "blk.{}.ffn_up.weight": "model.layers.{}.mlp.up_proj.weight",
    "blk.{}.ffn_up.bias": "model.layers.{}.mlp.up_proj.bias",
    "blk.{}.ffn_down.weight": "model.layers.{}.mlp.down_proj.weight",
    "blk.{}.ffn_down.bias": "model.layers.{}.mlp.down_proj.bias",
    # GPT-2 fuses q, k, v; split in `_split_qkv`.
    "blk.{}.attn_qkv.weight": "model.layers.{}.self_attn.qkv.weight",
    "blk.{}.attn_qkv.bias": "model.layers.{}.self_attn.qkv.bias",
}
# Gemma's sandwich norms: ffn_norm is the pre-MLP norm and two post norms exist.
GEMMA3_NAMES = {
    **GGUF_NAMES,
    "blk.{}.ffn_norm.weight": "model.layers.{}.pre_feedforward_layernorm.weight",
    "blk.{}.post_attention_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "blk.{}.post_ffw_norm.weight": "model.layers.{}.post_feedforward_layernorm.weight",
}
ARCH_STYLE = {"llama": (LLAMA_STYLE, GGUF_NAMES), "gemma3": (GEMMA3_STYLE, GEMMA3_NAMES),
              "gpt2": (GPT2_STYLE, GGUF_NAMES)}


def open_gguf(path: str | Path) -> GGUFReader:
    """Check the header, then parse; any damage becomes one CheckpointError naming the fix."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such GGUF file; check the path or run `lmforge pull NAME`")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(24)
    if len(head) < 24 or head[:4] != b"GGUF":
        raise CheckpointError(f"{path}: not a GGUF file (magic {head[:4]!r}, expected b'GGUF'); "
                              "pass a .gguf file or a Hugging Face directory")
    version, n_tensors, n_kv = struct.unpack("<IQQ", head[4:24])
    if version not in (2, 3):
        raise CheckpointError(f"{path}: GGUF version {version} is not supported (2 or 3)")
    if n_tensors > MAX_TENSORS or n_kv > MAX_KV or n_tensors * 24 > size:
        raise CheckpointError(f"{path}: header claims {n_tensors} tensors and {n_kv} metadata keys, "
                              f"impossible for a {size}-byte file; the file is corrupt, download it again")
    try:
        reader = GGUFReader(path)
    except Exception as err:  # the library raises many kinds on damaged input
        raise CheckpointError(f"{path}: GGUF is corrupt or truncated ({type(err).__name__}: {err}); "
                              "download it again (`lmforge pull NAME --force`)") from None
    _check_tensors(reader, path, size)
    return reader


def _check_tensors(reader: GGUFReader, path: Path, size: int) -> None:
    for t in reader.tensors:
        n = int(np.prod(t.shape, dtype=np.float64))
        if n <= 0 or n > MAX_ELEMENTS or any(int(d) <= 0 for d in t.shape):
            raise CheckpointError(f"{path}: tensor {t.name} has an impossible shape {list(t.shape)}; file is corrupt")
        if t.data_offset + t.n_bytes > size:
            raise CheckpointError(f"{path}: tensor {t.name} ends at byte {t.data_offset + t.n_bytes}, past the end "
                                  f"of the {size}-byte file; the file is truncated, download it again")


def metadata(reader: GGUFReader) -> dict[str, Any]:
    """Scalar and string metadata (large arrays such as the vocabulary are left out)."""
    out: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.ggml.") and key != "tokenizer.ggml.model" and len(field.data) > 64:
            continue
        try:
            out[key] = field.contents()
        except Exception as err:
            raise CheckpointError(f"metadata key {key!r} is unreadable ({err}); the file is corrupt") from None
    return out


def config_from_gguf(reader: GGUFReader, name: str = "gguf") -> Config:
    """Build a Config from `{arch}.*` metadata keys."""
    meta = metadata(reader)
    arch = meta.get("general.architecture")
    if arch not in ARCH_STYLE:
        raise CheckpointError(f"architecture {arch!r} is not supported; lmforge reads {sorted(ARCH_STYLE)}")
    style, _ = ARCH_STYLE[arch]

    def get(key: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise CheckpointError(f"GGUF metadata is missing {arch}.{key}; the file is incomplete")
        return value

    tensor_names = {t.name for t in reader.tensors}
    n_embd, n_head = int(get("embedding_length")), int(get("attention.head_count"))
    vocab = meta.get(f"{arch}.vocab_size")
    if vocab is None:
        vocab = len(reader.fields["tokenizer.ggml.tokens"].data) if "tokenizer.ggml.tokens" in reader.fields \
            else get("vocab_size")
    kwargs: dict[str, Any] = dict(
        style, name=name, vocab_size=int(vocab), n_layer=int(get("block_count")), n_embd=n_embd,
        n_head=n_head, n_kv_head=int(get("attention.head_count_kv", n_head)),
        head_dim=int(get("attention.key_length", n_embd // n_head)),
        intermediate_size=int(get("feed_forward_length")), block_size=int(get("context_length")),
        tie_embeddings="output.weight" not in tensor_names,
    )
    eps_key = "attention.layer_norm_epsilon" if arch == "gpt2" else "attention.layer_norm_rms_epsilon"
    kwargs["norm_eps"] = float(get(eps_key, style.get("norm_eps", 1e-5)))
    if arch != "gpt2":
        kwargs["rope_theta"] = float(get("rope.freq_base", 10000.0))
        kwargs.update(_rope_scaling(meta, arch))
    if arch == "gemma3":
        kwargs["sliding_window"] = int(get("attention.sliding_window"))
        kwargs["query_pre_attn_scalar"] = kwargs["head_dim"]  # Gemma 3 sets it to head_dim
    try:
        return Config(**kwargs)
    except ValueError as err:
        raise CheckpointError(f"GGUF metadata describes an impossible model: {err}") from None


def _rope_scaling(meta: dict[str, Any], arch: str) -> dict[str, Any]:
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    if kind in ("none", None):
        return {}
    if kind != "linear":
        raise CheckpointError(f"RoPE scaling {kind!r} in GGUF is not supported (none, linear)")
    return dict(rope_scaling="linear", rope_factor=float(meta.get(f"{arch}.rope.scaling.factor", 1.0)))


def hf_name(gguf_name: str, table: dict[str, str]) -> str | None:
    """Map one GGUF tensor name through the table, or None when it has no entry."""
    parts = gguf_name.split(".")
    if len(parts) > 2 and parts[0] == "blk" and parts[1].isdigit():
        key = ".".join(["blk", "{}", *parts[2:]])
        return table[key].format(parts[1]) if key in table else None
    return table.get(gguf_name)


def tensor_to_numpy(tensor) -> np.ndarray:
    """Dequantize one reader tensor to fp32 in numpy (row-major, GGUF's shape reversed)."""
    qtype = GGMLQuantizationType(tensor.tensor_type)
    if qtype == GGMLQuantizationType.F32:
        return np.array(tensor.data, dtype=np.float32)
    try:
        return dequantize(tensor.data, qtype).astype(np.float32, copy=False)
    except NotImplementedError:
        raise CheckpointError(f"tensor {tensor.name} has type {qtype.name}, which the gguf library cannot "
                              "dequantize; re-quantize the model to a common type (Q8_0, Q4_K, ...)") from None


def read_state_dict(reader: GGUFReader, config: Config, arch: str) -> dict[str, torch.Tensor]:
    """All tensors as fp32 torch tensors under Hugging Face names, layout fixed up per arch."""
    _, table = ARCH_STYLE[arch]
    unknown = [t.name for t in reader.tensors if hf_name(t.name, table) is None]
    if unknown:
        raise CheckpointError(f"unexpected GGUF tensors {unknown[:5]} (and {max(0, len(unknown) - 5)} more) "
                              f"for architecture {arch}; this file is not a plain {arch} model")
    with ThreadPoolExecutor(max_workers=2) as pool:  # numpy dequantization releases the GIL
        arrays = list(pool.map(tensor_to_numpy, reader.tensors))
    state: dict[str, torch.Tensor] = {}
    for t, array in zip(reader.tensors, arrays):
        name = hf_name(t.name, table)
        tensor = torch.from_numpy(array)
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config.n_head if "q_proj" in name else config.n_kv_head
            tensor = unpermute_rope(tensor, heads)
        if arch == "gemma3" and name.endswith("norm.weight"):
            tensor = tensor - 1.0  # llama.cpp stores Gemma's (1 + w); we keep Hugging Face's w
        if arch == "gpt2" and ".qkv." in name:
            state.update(_split_qkv(name, tensor, config))
            continue
        state[name] = tensor
    return state


def unpermute_rope(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation (interleaved -> half-split rotary layout)."""
    rows = weight.shape[0]
    pairs = weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:])  # (heads, hd/2, 2, ...)
    return pairs.transpose(1, 2).reshape(weight.shape)  # (heads, 2, hd/2, ...) -> rows


def _split_qkv(name: str, tensor: torch.Tensor, config: Config) -> dict[str, torch.Tensor]:
    q_dim, kv_dim = config.n_head * config.head_dim, config.n_kv_head * config.head_dim
    q, k, v = torch.split(tensor, [q_dim, kv_dim, kv_dim], dim=0)
    return {name.replace(".qkv.", f".{p}_proj."): part.contiguous() for p, part in zip("qkv", (q, k, v))}


def tensor_types(reader: GGUFReader) -> dict[str, int]:
    """How many tensors of each GGML type the file holds (for `lmforge info`)."""
    counts: dict[str, int] = {}
    for t in reader.tensors:
        kind = GGMLQuantizationType(t.tensor_type).name
        counts[kind] = counts.get(kind, 0) + 1
    return counts
