"""Load GGUF checkpoints (llama.cpp's format): config from metadata, weights kept in blocks or dequantized.

The container is parsed by `gguf_file.GGUFFile` (bounds-checked). With `native`, linear weights and
the token embedding of a type lmforge has kernels for stay in their quantized blocks (`BlockTensor`,
computed by `gguf_blocks.GGUFLinear`); other quantized tensors are dequantized to fp32 by
`lmforge.checkpoint.dequant` (Q4_0, Q4_1, Q8_0, in torch) or else by the `gguf` library
(`gguf.quants.dequantize`), which knows every GGML type. Names map to Hugging Face's through one
declarative table.
"""

from __future__ import annotations

import dataclasses
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from lmforge.checkpoint import dequant
from lmforge.checkpoint.errors import CheckpointError
from lmforge.checkpoint.gguf_blocks import BlockTensor, has_kernel
from lmforge.checkpoint.gguf_file import GGUFFile, TensorInfo
from lmforge.config import GEMMA3_STYLE, GPT2_STYLE, LLAMA_STYLE, Config

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


def open_gguf(path: str | Path) -> GGUFFile:
    """Parse and bounds-check a GGUF file; any damage becomes one CheckpointError naming the fix."""
    return GGUFFile(path)


def config_from_gguf(reader: GGUFFile, name: str = "gguf") -> Config:
    """Build a Config from `{arch}.*` metadata keys."""
    meta = reader.metadata
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
        vocab = len(meta["tokenizer.ggml.tokens"]) if "tokenizer.ggml.tokens" in meta else get("vocab_size")
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
    _check_sizes(kwargs)
    try:
        return Config(**kwargs)
    except ValueError as err:
        raise CheckpointError(f"GGUF metadata describes an impossible model: {err}") from None


LIMITS = dict(vocab_size=1 << 22, n_layer=1024, n_embd=1 << 16, n_head=1024, n_kv_head=1024, head_dim=4096,
              intermediate_size=1 << 18, block_size=1 << 24)


def _check_sizes(kwargs: dict[str, Any]) -> None:
    """Refuse sizes no real model has before building anything from them (damaged metadata)."""
    for key, limit in LIMITS.items():
        if not 1 <= kwargs[key] <= limit:
            raise CheckpointError(f"GGUF metadata gives {key}={kwargs[key]}, outside 1..{limit}; the file is corrupt")


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


def tensor_to_numpy(reader: GGUFFile, tensor: TensorInfo) -> np.ndarray:
    """Dequantize one tensor to fp32 in numpy (row-major, GGUF's shape reversed)."""
    qtype, data = tensor.qtype, reader.raw(tensor)
    if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        return data.astype(np.float32)  # a private copy, so torch gets writable memory
    try:
        return dequantize(data, qtype).astype(np.float32, copy=False).reshape(tensor.shape)
    except NotImplementedError:
        raise CheckpointError(f"tensor {tensor.name} has type {qtype.name}, which the gguf library cannot "
                              "dequantize; re-quantize the model to a common type (Q8_0, Q4_K, ...)") from None


FLOAT_TYPES = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)


def keeps_blocks(name: str) -> bool:
    """Whether a tensor (Hugging Face name) is one a native load keeps in blocks: the linear weights and the
    token embedding; norms, biases and learned positions are small and stay fp32."""
    return name.endswith(("_proj.weight", ".qkv.weight")) or name in ("lm_head.weight", "model.embed_tokens.weight")


def _warn_fallback(reader: GGUFFile, table: dict[str, str]) -> None:
    """One warning naming the quantized types of would-be native tensors that have no kernel (dequantized)."""
    slow = [t for t in reader.tensors if t.qtype not in FLOAT_TYPES and not has_kernel(t.qtype)
            and keeps_blocks(hf_name(t.name, table))]
    if slow:
        kinds = ", ".join(sorted({t.qtype.name for t in slow}))
        warnings.warn(f"GGUF tensor type(s) {kinds} have no lmforge kernel: {len(slow)} tensors of those types are "
                      f"dequantized to fp32 (larger and slower than blocks)", stacklevel=3)


def _read(reader: GGUFFile, t: TensorInfo, native: bool, name: str) -> torch.Tensor | BlockTensor:
    """One tensor: its blocks copied out of the file when native can keep them, else fp32."""
    if native and has_kernel(t.qtype) and keeps_blocks(name):
        return BlockTensor(torch.from_numpy(np.array(reader.raw(t))), t.qtype, tuple(t.shape))
    tensor = dequant.dequantize(reader.raw(t), t.qtype, t.shape)
    return torch.from_numpy(tensor_to_numpy(reader, t)) if tensor is None else tensor


def _on_rows(tensor: torch.Tensor | BlockTensor,
             fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor | BlockTensor:
    """fn applied to the rows of an fp32 weight, or of a BlockTensor's blocks (a row of blocks is a row)."""
    if isinstance(tensor, BlockTensor):
        return dataclasses.replace(tensor, blocks=fn(tensor.blocks).contiguous())
    return fn(tensor)


def read_state_dict(reader: GGUFFile, config: Config, arch: str,
                    native: bool = False) -> dict[str, torch.Tensor | BlockTensor]:
    """All tensors under Hugging Face names, layout fixed up per arch: fp32 torch tensors, except with
    `native` the linear weights and token embedding of a type with a kernel, kept as `BlockTensor`s."""
    _, table = ARCH_STYLE[arch]
    unknown = [t.name for t in reader.tensors if hf_name(t.name, table) is None]
    if unknown:
        raise CheckpointError(f"unexpected GGUF tensors {unknown[:5]} (and {max(0, len(unknown) - 5)} more) "
                              f"for architecture {arch}; this file is not a plain {arch} model")
    if native:
        _warn_fallback(reader, table)

    def convert(t: TensorInfo) -> tuple[str, torch.Tensor | BlockTensor]:
        name = hf_name(t.name, table)
        tensor = _read(reader, t, native, name)
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config.n_head if "q_proj" in name else config.n_kv_head
            tensor = _on_rows(tensor, lambda w: unpermute_rope(w, heads))
        if arch == "gemma3" and name.endswith("norm.weight"):
            tensor = tensor - 1.0  # llama.cpp stores Gemma's (1 + w); we keep Hugging Face's w
        return name, tensor

    with ThreadPoolExecutor(max_workers=2) as pool:  # numpy and torch copies release the GIL
        converted = list(pool.map(convert, reader.tensors))
    state: dict[str, torch.Tensor] = {}
    for name, tensor in converted:
        if arch == "gpt2" and ".qkv." in name:
            state.update(_split_qkv(name, tensor, config))
        else:
            state[name] = tensor
    return state


def unpermute_rope(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation (interleaved -> half-split rotary layout)."""
    rows = weight.shape[0]
    pairs = weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:])  # (heads, hd/2, 2, ...)
    return pairs.transpose(1, 2).reshape(weight.shape)  # (heads, 2, hd/2, ...) -> rows


def _split_qkv(name: str, tensor: torch.Tensor | BlockTensor, config: Config) -> dict[str, torch.Tensor | BlockTensor]:
    q_dim, kv_dim = config.n_head * config.head_dim, config.n_kv_head * config.head_dim
    sizes = [q_dim, kv_dim, kv_dim]
    if isinstance(tensor, BlockTensor):
        parts = [BlockTensor(p.contiguous(), tensor.qtype, (p.shape[0], tensor.shape[1]))
                 for p in torch.split(tensor.blocks, sizes, dim=0)]
    else:
        parts = [p.contiguous() for p in torch.split(tensor, sizes, dim=0)]
    return {name.replace(".qkv.", f".{p}_proj."): part for p, part in zip("qkv", parts)}


def tensor_types(reader: GGUFFile) -> dict[str, int]:
    """How many tensors of each GGML type the file holds (for `lmforge info`)."""
    counts: dict[str, int] = {}
    for t in reader.tensors:
        kind = t.qtype.name
        counts[kind] = counts.get(kind, 0) + 1
    return counts
