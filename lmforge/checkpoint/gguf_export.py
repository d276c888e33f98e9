"""Write a model as GGUF (llama.cpp's format) through the `gguf` library's writer.

The inverse of `lmforge.checkpoint.gguf`: tensors go out under llama.cpp's names (the same
name table, inverted), quantized by `gguf.quants.quantize`; LLaMA q/k rows get llama.cpp's
RoPE permutation back (the inverse of `unpermute_rope`) and Gemma's norms their stored
(1 + w). The tokenizer and chat template are copied from a source GGUF, or built from a
Hugging Face tokenizer.json (byte-level BPE only, llama.cpp's "gpt2" tokenizer model).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from collections.abc import Iterator
from typing import Any, Literal

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGML_QUANT_VERSION, GGMLQuantizationType, GGUFValueType, GGUFWriter
from gguf import LlamaFileType, RopeScalingType, TokenType
from gguf.quants import quantize
from tqdm import tqdm

from lmforge.atomic import atomic_write
from lmforge.checkpoint.gguf import ARCH_STYLE
from lmforge.checkpoint.gguf_blocks import float_state_dict
from lmforge.checkpoint.gguf_file import GGUFFile
from lmforge.config import Config
from lmforge.tokenizer import PRE_TOKENIZER_SPLITS, Tokenizer

Q = GGMLQuantizationType
TensorType = Literal["f32", "f16", "q8_0", "q4_0"]
TENSOR_TYPES = {"f32": Q.F32, "f16": Q.F16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}
FILE_TYPES = {Q.F32: LlamaFileType.ALL_F32, Q.F16: LlamaFileType.MOSTLY_F16, Q.Q8_0: LlamaFileType.MOSTLY_Q8_0,
              Q.Q4_0: LlamaFileType.MOSTLY_Q4_0}
GEMMA3_SWA_PATTERN = 6  # llama.cpp hard-codes Gemma 3's five sliding layers per global one
GEMMA3_LOCAL_THETA = 10000.0  # and the sliding layers' RoPE base (as our loader assumes)


def save_gguf(model: torch.nn.Module, tokenizer_source: str | Path, path: str | Path,
              tensor_type: TensorType = "q8_0") -> Path:
    """Write `model` and the tokenizer of `tokenizer_source` as one GGUF file llama.cpp loads.

    Args:
        model: a LLaMA-style or Gemma 3 `Transformer` (weights as loaded or trained, any dtype).
        tokenizer_source: a .gguf file (its `tokenizer.*` keys are copied) or a Hugging Face
            directory with a byte-level BPE tokenizer.json.
        path: the .gguf file to write (atomically: a temp file in the same folder, then rename).
        tensor_type: f32, f16, q8_0 or q4_0 for the matrices; 1-D tensors (norms) stay F32. Q4_0
            costs small models much (SmolLM2-135M: relative logit error 0.5); q8_0 is near lossless.
    """
    if tensor_type not in TENSOR_TYPES:
        raise ValueError(f"tensor_type {tensor_type!r} is not supported; choose one of {sorted(TENSOR_TYPES)}")
    qtype, config, path = TENSOR_TYPES[tensor_type], model.config, Path(path)
    arch = architecture(config)
    _check_target(path)
    tokenizer_kv = tokenizer_metadata(tokenizer_source)
    n_tokens = len(tokenizer_kv["tokenizer.ggml.tokens"][0])
    if n_tokens != config.vocab_size:
        raise ValueError(f"the tokenizer of {tokenizer_source} has {n_tokens} tokens but the model's vocab_size is "
                         f"{config.vocab_size}; pass the tokenizer the model was trained with")
    writer = GGUFWriter(None, arch)
    add_architecture_metadata(writer, config, arch)
    writer.add_name(config.name)
    writer.add_file_type(FILE_TYPES[qtype])
    writer.add_quantization_version(GGML_QUANT_VERSION)
    for key, (value, vtype, sub_type) in tokenizer_kv.items():
        writer.add_key_value(key, value, vtype, sub_type)
    n_tensors = len(float_state_dict(model)) - int(config.tie_embeddings)
    for name, array in tqdm(gguf_tensors(model, arch), f"GGUF {qtype.name}", n_tensors, leave=False, unit="tensor"):
        data, raw_type = quantize_tensor(name, array, qtype)
        writer.add_tensor(name, data, raw_dtype=raw_type)
    _write_atomically(writer, path)
    return path


def architecture(config: Config) -> str:
    """The llama.cpp architecture that computes exactly what `config` describes, or a ValueError."""
    if config.position != "rope" or config.norm != "rmsnorm":
        raise ValueError(f"GGUF export writes LLaMA-style and Gemma 3 models; {config.name} has "
                         f"position={config.position!r}, norm={config.norm!r} (GPT-2 style is not supported)")
    gemma = (config.mlp, config.qk_norm, config.sandwich_norm, config.embedding_scale, config.norm_unit_offset)
    if gemma == ("swiglu", False, False, False, False):
        arch = "llama"
    elif gemma == ("geglu", True, True, True, True):
        arch = "gemma3"
    else:
        raise ValueError(f"{config.name} mixes LLaMA and Gemma features (mlp, qk_norm, sandwich_norm, "
                         f"embedding_scale, norm_unit_offset = {gemma}); llama.cpp has no such architecture")
    problems = []
    if config.bias:
        problems.append("bias=True (llama.cpp's llama and gemma3 have no q/k/v biases here)")
    if config.rope_scaling not in (("none", "linear") if arch == "llama" else ("none",)):
        problems.append(f"rope_scaling={config.rope_scaling!r} (export writes none or linear for llama, none for "
                        "gemma3, whose llama.cpp scales only the global layers)")
    if config.query_pre_attn_scalar not in (None, config.head_dim):
        problems.append(f"query_pre_attn_scalar={config.query_pre_attn_scalar} (llama.cpp scales by head_dim)")
    if config.final_logit_softcap or config.attn_logit_softcap:
        problems.append("logit soft-capping")
    if config.sparse_patterns:
        problems.append(f"sparse_patterns {sorted(config.sparse_patterns)} (llama.cpp attends to every key)")
    if arch == "llama" and config.sliding_window:
        problems.append(f"sliding_window={config.sliding_window} (llama.cpp's llama has none)")
    if arch == "gemma3":
        swa = ["global" if (i + 1) % GEMMA3_SWA_PATTERN == 0 else "sliding" for i in range(config.n_layer)]
        if not config.sliding_window or config.layer_types != swa or config.rope_local_theta != GEMMA3_LOCAL_THETA:
            problems.append("a sliding-window layout other than Gemma 3's (window set, every 6th layer global, "
                            "local RoPE base 10000)")
    if problems:
        raise ValueError(f"{config.name} cannot be written as GGUF {arch}: {'; '.join(problems)}")
    return arch


def add_architecture_metadata(writer: GGUFWriter, config: Config, arch: str) -> None:
    """The `{arch}.*` hyperparameter keys llama.cpp (and `config_from_gguf`) read."""
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.block_size)
    writer.add_embedding_length(config.n_embd)
    writer.add_block_count(config.n_layer)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.n_head)
    writer.add_head_count_kv(config.n_kv_head)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_rope_dimension_count(config.head_dim)
    if arch == "gemma3" or config.head_dim != config.n_embd // config.n_head:
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
    if config.rope_scaling == "linear":
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(config.rope_factor)
    if arch == "gemma3":
        writer.add_sliding_window(config.sliding_window)


def gguf_tensors(model: torch.nn.Module, arch: str) -> Iterator[tuple[str, np.ndarray]]:
    """(llama.cpp name, fp32 row-major array) for every weight, in llama.cpp's layout, one at a time."""
    config: Config = model.config
    inverse = {hf: gg for gg, hf in ARCH_STYLE[arch][1].items()}
    for name, tensor in float_state_dict(model).items():
        if name == "lm_head.weight" and config.tie_embeddings:
            continue  # llama.cpp reuses token_embd when output.weight is absent
        tensor = tensor.detach().to("cpu", torch.float32)
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            tensor = permute_rope(tensor, config.n_head if "q_proj" in name else config.n_kv_head)
        if arch == "gemma3" and name.endswith("norm.weight"):
            tensor = tensor + 1.0  # llama.cpp stores Gemma's (1 + w)
        yield _gguf_name(name, inverse), np.ascontiguousarray(tensor.numpy())


def _gguf_name(hf_name: str, inverse: dict[str, str]) -> str:
    parts = hf_name.split(".")
    layer = parts[2] if len(parts) > 3 and parts[:2] == ["model", "layers"] and parts[2].isdigit() else None
    key = ".".join(["model", "layers", "{}", *parts[3:]]) if layer else hf_name
    if key not in inverse:
        raise ValueError(f"tensor {hf_name!r} has no GGUF name; merge adapters (LoRA) or unwrap quantized "
                         "layers into plain nn.Linear weights before exporting")
    return inverse[key].format(layer)


def permute_rope(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's Q/K row permutation (half-split -> interleaved rotary layout); inverse of `unpermute_rope`."""
    rows = weight.shape[0]
    halves = weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:])  # (heads, 2, hd/2, ...)
    return halves.transpose(1, 2).reshape(weight.shape)  # (heads, hd/2, 2, ...) -> rows


def quantize_tensor(name: str, array: np.ndarray, qtype: GGMLQuantizationType) -> tuple[np.ndarray, Q]:
    """The stored form of one tensor: 1-D stays F32; a row not a multiple of the block falls back to F16."""
    if array.ndim == 1:
        return array.astype(np.float32), Q.F32
    block = GGML_QUANT_SIZES[qtype][0]
    if array.shape[-1] % block:
        warnings.warn(f"{name}: row length {array.shape[-1]} is not a multiple of the {qtype.name} block ({block}); "
                      "stored as F16", stacklevel=3)
        qtype = Q.F16
    return quantize(array, qtype), qtype


def tokenizer_metadata(source: str | Path) -> dict[str, tuple[Any, GGUFValueType, GGUFValueType | None]]:
    """`tokenizer.*` keys as key -> (value, type, array element type), from a GGUF file or HF directory."""
    source = Path(source)
    if source.is_dir():
        return _hf_tokenizer_metadata(source)
    if not source.is_file():
        raise ValueError(f"tokenizer source {source} does not exist; pass a .gguf file or a Hugging Face directory")
    meta = GGUFFile(source).metadata  # bounds-checked, and ~50x faster than gguf.GGUFReader on a vocabulary
    out = {key: _typed(key, value) for key, value in meta.items() if key.startswith("tokenizer.")}
    if "tokenizer.ggml.tokens" not in out:
        raise ValueError(f"{source} has no tokenizer.ggml.tokens; pass a GGUF file that carries a tokenizer")
    return out


_ARRAY_TYPES = {np.dtype(d): GGUFValueType[t] for d, t in (
    ("u1", "UINT8"), ("i1", "INT8"), ("u2", "UINT16"), ("i2", "INT16"), ("u4", "UINT32"), ("i4", "INT32"),
    ("u8", "UINT64"), ("i8", "INT64"), ("f4", "FLOAT32"), ("f8", "FLOAT64"), ("?", "BOOL"))}


def _typed(key: str, value: Any) -> tuple[Any, GGUFValueType, GGUFValueType | None]:
    """A metadata value with the GGUF type llama.cpp reads it as (ids uint32, flags bool, floats f32)."""
    if isinstance(value, np.ndarray):
        return value.tolist(), GGUFValueType.ARRAY, _ARRAY_TYPES[value.dtype]
    if isinstance(value, list):
        if not value or not all(isinstance(v, str) for v in value):
            raise ValueError(f"tokenizer metadata {key!r} is an empty or mixed array; the source GGUF is unusual")
        return value, GGUFValueType.ARRAY, GGUFValueType.STRING
    if isinstance(value, bool):
        return value, GGUFValueType.BOOL, None
    if isinstance(value, int):
        return value, GGUFValueType.UINT32 if value >= 0 else GGUFValueType.INT32, None
    if isinstance(value, float):
        return value, GGUFValueType.FLOAT32, None
    return value, GGUFValueType.STRING, None


def _hf_tokenizer_metadata(path: Path) -> dict[str, tuple[Any, GGUFValueType, GGUFValueType | None]]:
    """llama.cpp's "gpt2" tokenizer keys from a byte-level BPE tokenizer.json (as its converter builds them)."""
    tok = Tokenizer.from_hf_dir(path)  # special ids, BOS/EOS policy and chat template, as lmforge reads them
    spec = json.loads((path / "tokenizer.json").read_text("utf-8"))
    model, pre = spec.get("model") or {}, _pre_tokenizer_name(spec.get("pre_tokenizer"))
    if model.get("type") != "BPE" or pre is None:
        raise ValueError(f"{path}/tokenizer.json is not a byte-level BPE tokenizer lmforge can describe to llama.cpp "
                         f"(model {model.get('type')!r}, pre-tokenizer {spec.get('pre_tokenizer')}); pass the "
                         "model's .gguf file as the tokenizer source instead")
    n = 1 + max([*model["vocab"].values(), *(a["id"] for a in spec.get("added_tokens", []))])
    tokens, types = [f"[PAD{i}]" for i in range(n)], [int(TokenType.UNUSED)] * n  # ids no token claims
    for text, i in model["vocab"].items():
        tokens[i], types[i] = text, int(TokenType.NORMAL)
    for added in spec.get("added_tokens", []):
        tokens[added["id"]] = added["content"]
        types[added["id"]] = int(TokenType.CONTROL if added["special"] else TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    A, S, U, B = GGUFValueType.ARRAY, GGUFValueType.STRING, GGUFValueType.UINT32, GGUFValueType.BOOL
    out: dict[str, tuple[Any, GGUFValueType, GGUFValueType | None]] = {
        "tokenizer.ggml.model": ("gpt2", S, None), "tokenizer.ggml.pre": (pre, S, None),
        "tokenizer.ggml.tokens": (tokens, A, S), "tokenizer.ggml.token_type": (types, A, GGUFValueType.INT32),
        "tokenizer.ggml.merges": (merges, A, S),
    }
    for key, value in (("bos", tok.bos_id), ("eos", tok.eos_id), ("padding", tok.pad_id)):
        if value is not None:
            out[f"tokenizer.ggml.{key}_token_id"] = (value, U, None)
    specials = tok.encode("", add_special_tokens=True)
    out["tokenizer.ggml.add_bos_token"] = (tok.bos_id is not None and tok.bos_id in specials, B, None)
    out["tokenizer.ggml.add_eos_token"] = (tok.eos_id is not None and tok.eos_id in specials, B, None)
    if not tok.chat_template.is_fallback:
        out["tokenizer.chat_template"] = (tok.chat_template.source, S, None)
    return out


def _pre_tokenizer_name(pre: dict[str, Any] | None) -> str | None:
    """llama.cpp's name for a tokenizer.json pre-tokenizer that splits text as it does, else None."""
    steps = (pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]) if pre else []
    kinds = [s.get("type") for s in steps]
    last = steps[-1] if steps else {}
    if last.get("add_prefix_space"):
        return None  # llama.cpp never adds a prefix space in byte-level BPE
    byte_regex = last.get("use_regex", True)
    if kinds == ["ByteLevel"] and byte_regex:
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and byte_regex:
        return "smollm"  # SmolLM: digits one by one, then GPT-2's split
    if kinds == ["Split", "ByteLevel"] and not byte_regex:
        regex = (steps[0].get("pattern") or {}).get("Regex")
        return {PRE_TOKENIZER_SPLITS[name]: name for name in ("llama-bpe", "qwen2")}.get(regex)
    return None


def _check_target(path: Path) -> None:
    """Refuse an output path that cannot be written before any work is done."""
    if path.is_dir():
        raise ValueError(f"output path {path} is a directory; pass a file name such as {path / 'model.gguf'}")
    if not path.parent.is_dir():
        raise ValueError(f"the folder of {path} does not exist; create {path.parent} first")


def _write_atomically(writer: GGUFWriter, path: Path) -> None:
    """Header, metadata and tensors into a temp file beside `path`, renamed over it only when complete."""
    def write(tmp: Path) -> None:
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    try:
        atomic_write(path, write)
    except OSError as err:
        raise OSError(f"could not write {path} ({err.strerror or err}); no file was left behind -- "
                      "check free space and permissions, or choose another path") from err
    finally:
        writer.close()