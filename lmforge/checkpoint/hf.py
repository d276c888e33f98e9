"""Hugging Face checkpoints: config.json + safetensors, read and written.

LLaMA-family and Gemma 3 keys are already ours; GPT-2's Conv1D layout maps through one
name table (its weights are stored transposed, q/k/v fused).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lmforge.atomic import atomic_write, atomic_write_text
from lmforge.checkpoint.errors import CheckpointError
from lmforge.checkpoint.gguf_blocks import float_state_dict
from lmforge.checkpoint.hf_bert import BERT_TYPES, bert_config, bert_state, hf_bert_config, hf_bert_state
from lmforge.checkpoint.hf_t5 import T5_TYPES, hf_t5_config, t5_config, t5_state
from lmforge.checkpoint.hf_mamba import MAMBA_TYPES, OTHER_SSM_TYPES, hf_mamba_config, mamba_config, mamba_state
from lmforge.checkpoint.hf_moe import MOE_TYPES, hf_moe_fields, moe_fields, stack_experts, unstack_experts
from lmforge.config import GEMMA3_STYLE, GPT2_STYLE, LLAMA_STYLE, Config
from lmforge.model.rope import yarn_mscale

LLAMA_TYPES = ("llama", "mistral")
GEMMA3_TYPES = ("gemma3_text",)
GPT2_TYPES = ("gpt2",)

# GPT-2 Hugging Face name -> ours; "{}" is the layer index. Conv1D weights are (in, out).
GPT2_NAMES: dict[str, str] = {
    "transformer.wte.weight": "model.embed_tokens.weight",
    "transformer.wpe.weight": "model.embed_positions.weight",
    "transformer.ln_f.weight": "model.norm.weight",
    "transformer.ln_f.bias": "model.norm.bias",
    "transformer.h.{}.ln_1.weight": "model.layers.{}.input_layernorm.weight",
    "transformer.h.{}.ln_1.bias": "model.layers.{}.input_layernorm.bias",
    "transformer.h.{}.ln_2.weight": "model.layers.{}.post_attention_layernorm.weight",
    "transformer.h.{}.ln_2.bias": "model.layers.{}.post_attention_layernorm.bias",
    "transformer.h.{}.attn.c_attn.weight": "model.layers.{}.self_attn.qkv.weight",
    "transformer.h.{}.attn.c_attn.bias": "model.layers.{}.self_attn.qkv.bias",
    "transformer.h.{}.attn.c_proj.weight": "model.layers.{}.self_attn.o_proj.weight",
    "transformer.h.{}.attn.c_proj.bias": "model.layers.{}.self_attn.o_proj.bias",
    "transformer.h.{}.mlp.c_fc.weight": "model.layers.{}.mlp.up_proj.weight",
    "transformer.h.{}.mlp.c_fc.bias": "model.layers.{}.mlp.up_proj.bias",
    "transformer.h.{}.mlp.c_proj.weight": "model.layers.{}.mlp.down_proj.weight",
    "transformer.h.{}.mlp.c_proj.bias": "model.layers.{}.mlp.down_proj.bias",
    "lm_head.weight": "lm_head.weight",
}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing; a Hugging Face directory needs config.json + *.safetensors")
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON ({err})") from None


def _rope(cfg: dict[str, Any], kind: str) -> dict[str, Any]:
    """Rope settings from transformers 5 `rope_parameters` or the older flat keys."""
    params = cfg.get("rope_parameters") or {}
    if kind in params:
        params = params[kind]
    if not params:
        params = dict(cfg.get("rope_scaling") or {}, rope_theta=cfg.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    out: dict[str, Any] = {"theta": float(params.get("rope_theta", 10000.0))}
    max_pos = cfg.get("max_position_embeddings", 2048)
    original = int(cfg.get("original_max_position_embeddings") or params.get("original_max_position_embeddings")
                   or max_pos)
    if rope_type in ("linear", "llama3", "dynamic", "yarn"):
        factor = params.get("factor") or max_pos / original  # yarn may give only the two lengths
        out.update(rope_scaling=rope_type, rope_factor=float(factor), rope_original_max_position=original)
    if rope_type == "llama3":
        out.update(rope_low_freq_factor=float(params["low_freq_factor"]),
                   rope_high_freq_factor=float(params["high_freq_factor"]))
    elif rope_type == "dynamic":  # transformers grows the base past max_position_embeddings itself
        out.update(rope_original_max_position=max_pos)
    elif rope_type == "yarn":
        out.update(rope_beta_fast=float(params.get("beta_fast") or 32), rope_beta_slow=float(params.get("beta_slow") or 1))
        if params.get("attention_factor") is not None:
            out["rope_attention_factor"] = float(params["attention_factor"])
        elif params.get("mscale") and params.get("mscale_all_dim"):
            out["rope_attention_factor"] = yarn_mscale(factor, params["mscale"]) / yarn_mscale(factor, params["mscale_all_dim"])
        if params.get("truncate", True) is False:
            raise CheckpointError("yarn with truncate=false is not supported; lmforge rounds the correction range")
    elif rope_type not in ("default", "linear"):
        raise CheckpointError(f"rope type {rope_type!r} is not supported (default, linear, llama3, dynamic, yarn)")
    return out


def config_from_hf(path: str | Path) -> Config:
    """A Config from a Hugging Face config.json."""
    path = Path(path)
    cfg = _read_json(path / "config.json")
    kind = cfg.get("model_type")
    try:
        if kind in GPT2_TYPES:
            return Config(**dict(GPT2_STYLE, name=path.name, vocab_size=cfg["vocab_size"], n_layer=cfg["n_layer"],
                                 n_embd=cfg["n_embd"], n_head=cfg["n_head"], block_size=cfg["n_positions"],
                                 intermediate_size=cfg.get("n_inner") or 4 * cfg["n_embd"],
                                 norm_eps=cfg.get("layer_norm_epsilon", 1e-5), tie_embeddings=True))
        if kind in LLAMA_TYPES + GEMMA3_TYPES + MOE_TYPES:
            return _llama_like(cfg, kind, path.name)
        if kind in MAMBA_TYPES:
            return mamba_config(cfg, path.name)
        if kind in BERT_TYPES:
            return bert_config(cfg, path)
        if kind in T5_TYPES:
            return t5_config(cfg, path.name)
    except KeyError as err:
        raise CheckpointError(f"{path / 'config.json'} lacks the key {err}") from None
    if kind in OTHER_SSM_TYPES:
        raise CheckpointError(f"model_type {kind!r} is {OTHER_SSM_TYPES[kind]}, not Mamba-1's mixer; lmforge "
                              f"reads Mamba checkpoints of model_type {list(MAMBA_TYPES)}")
    raise CheckpointError(f"model_type {kind!r} is not supported; lmforge reads "
                          f"{list(LLAMA_TYPES + GEMMA3_TYPES + GPT2_TYPES + MOE_TYPES + MAMBA_TYPES + BERT_TYPES + T5_TYPES)}")


def _llama_like(cfg: dict[str, Any], kind: str, name: str) -> Config:
    gemma = kind in GEMMA3_TYPES
    rope = _rope(cfg, "full_attention")
    kwargs: dict[str, Any] = dict(
        GEMMA3_STYLE if gemma else LLAMA_STYLE, name=name, vocab_size=cfg["vocab_size"],
        n_layer=cfg["num_hidden_layers"], n_embd=cfg["hidden_size"], n_head=cfg["num_attention_heads"],
        n_kv_head=cfg.get("num_key_value_heads"), head_dim=cfg.get("head_dim"),
        intermediate_size=cfg["intermediate_size"], block_size=cfg.get("max_position_embeddings", 2048),
        norm_eps=cfg.get("rms_norm_eps", 1e-6), rope_theta=rope.pop("theta"),
        tie_embeddings=cfg.get("tie_word_embeddings", gemma), bias=cfg.get("attention_bias", False), **rope,
    )
    if rope.get("rope_scaling") in ("dynamic", "yarn"):  # they exist to run past the trained context
        kwargs["block_size"] = max(kwargs["block_size"], int(rope["rope_original_max_position"] * rope["rope_factor"]))
    if gemma:
        kwargs.update(
            query_pre_attn_scalar=cfg.get("query_pre_attn_scalar"), sliding_window=cfg.get("sliding_window"),
            rope_local_theta=_rope(cfg, "sliding_attention")["theta"] if "rope_parameters" in cfg
            else cfg.get("rope_local_base_freq", 10000.0),
            final_logit_softcap=cfg.get("final_logit_softcapping"),
            attn_logit_softcap=cfg.get("attn_logit_softcapping"),
        )
        if cfg.get("layer_types"):
            kwargs["layer_types"] = ["sliding" if t == "sliding_attention" else "global" for t in cfg["layer_types"]]
    elif cfg.get("sliding_window"):
        kwargs.update(sliding_window=cfg["sliding_window"], sliding_window_pattern=0)
    if kind in MOE_TYPES:
        kwargs.update(moe_fields(cfg, kind))
    return Config(**kwargs)


def _safetensor_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return sorted({path / f for f in _read_json(index)["weight_map"].values()})
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path} has no *.safetensors files (pickled .bin checkpoints are never loaded; "
                              "convert them to safetensors first)")
    return files


def read_hf_state(path: str | Path, config: Config) -> dict[str, torch.Tensor]:
    """All tensors of a Hugging Face directory under our names, as fp32."""
    path = Path(path)
    raw: dict[str, torch.Tensor] = {}
    for file in _safetensor_files(path):
        try:
            raw.update(load_file(file))
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{file}: unreadable safetensors ({err}); download it again") from None
    raw = {k.removeprefix("language_model."): v.float() for k, v in raw.items()}
    if config.arch == "mamba":  # Hugging Face's Mamba names are ours
        return mamba_state(raw)
    if config.arch == "encoder":  # BERT: ours too, but for BertForMaskedLM's "bert." prefix
        return bert_state(raw, config)
    if config.arch == "encoder_decoder":  # T5: ours, less the aliases of `shared`
        return t5_state(raw, config)
    if config.position == "learned":  # GPT-2
        return _from_gpt2(raw, config)
    if config.n_experts:  # Mixtral, Qwen2-MoE: per-expert hub tensors stacked
        return stack_experts(raw, config)
    return raw


def _from_gpt2(raw: dict[str, torch.Tensor], config: Config) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, tensor in raw.items():
        if key.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # old causal-mask buffers, not weights
        parts = key.split(".")
        layer = next((p for p in parts if p.isdigit()), None)
        ours = GPT2_NAMES.get(key.replace(f".{layer}.", ".{}.", 1) if layer else key)
        if ours is None:
            raise CheckpointError(f"unexpected GPT-2 tensor {key!r}")
        ours = ours.format(layer)
        if tensor.dim() == 2 and "wte" not in key and "wpe" not in key and key != "lm_head.weight":
            tensor = tensor.t().contiguous()  # Conv1D (in, out) -> Linear (out, in)
        if ".qkv." in ours:
            q, k, v = tensor.split(config.n_embd, dim=0)
            out.update({ours.replace(".qkv.", f".{n}_proj."): t.contiguous() for n, t in zip("qkv", (q, k, v))})
        else:
            out[ours] = tensor
    return out


def save_hf(model, path: str | Path) -> Path:
    """Write a LLaMA-style, Gemma 3, Mixtral, Qwen2-MoE, Mamba, BERT or T5 model as config.json +
    model.safetensors (atomically)."""
    path = Path(path)
    config: Config = model.config
    if config.position != "rope" and config.arch not in ("encoder", "encoder_decoder"):
        raise ValueError("save_hf writes LLaMA-style and Gemma 3 models; GPT-2 export is not supported yet")
    if config.sparse_patterns:
        raise ValueError(f"save_hf: sparse_patterns {sorted(config.sparse_patterns)} have no Hugging Face config "
                         "field, so transformers would attend to every key; keep sparse models in lmforge's format")
    state = {k: v.detach().contiguous() for k, v in float_state_dict(model).items()}
    plain = set(_plain_keys(config))
    extra = sorted(set(state) - plain)
    if extra:
        raise ValueError(f"the model has tensors a plain {config.name} checkpoint does not ({extra[:3]}): merge "
                         f"adapters (LoRA) first; a quantized model is exported from its float source")
    if config.n_experts:  # the hub's per-expert layout, which every transformers version reads
        state = unstack_experts(state, config)
    if config.arch == "encoder":  # BertModel's names, under "bert." beside an MLM head
        state = hf_bert_state(state, config)
    path.mkdir(parents=True, exist_ok=True)
    if config.tie_embeddings:
        state.pop("lm_head.weight", None)
    atomic_write(path / "model.safetensors", lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))
    hf = hf_config(config)
    atomic_write_text(path / "config.json", json.dumps(hf, indent=2))
    return path


def _plain_keys(config: Config) -> list[str]:
    """The state_dict keys of an unmodified model with this config (built on the meta device)."""
    from lmforge.model.transformer import model_class

    with torch.device("meta"):
        return list(model_class(config)(config).state_dict())


def save_pretrained(model, tokenizer, path: str | Path) -> Path:
    """A complete Hugging Face directory: weights and config (save_hf), tokenizer with chat template,
    generation config; what transformers and vLLM load as is."""
    path = save_hf(model, path)
    tokenizer.save_hf(path, model_max_length=model.config.block_size)
    stops = sorted(tokenizer.stop_ids)
    generation = {"bos_token_id": tokenizer.bos_id, "eos_token_id": stops if len(stops) > 1 else tokenizer.eos_id,
                  "pad_token_id": tokenizer.pad_id}
    atomic_write_text(path / "generation_config.json", json.dumps(generation, indent=2))
    return path


def _hf_rope(config: Config) -> dict[str, Any]:
    """The rope keys of config.json for a scaling kind (NTK-aware is a plain larger base there)."""
    kind, factor = config.rope_scaling, config.rope_factor
    if kind == "none":
        return {}
    if kind == "ntk":
        return {"rope_theta": config.rope_theta * factor ** (config.head_dim / (config.head_dim - 2))}
    params: dict[str, Any] = dict(rope_type=kind, factor=factor)
    if kind == "dynamic":
        return {"rope_scaling": params, "max_position_embeddings": config.rope_original_max_position}
    params["original_max_position_embeddings"] = config.rope_original_max_position
    if kind == "llama3":
        params.update(low_freq_factor=config.rope_low_freq_factor, high_freq_factor=config.rope_high_freq_factor)
    elif kind == "yarn":
        params.update(beta_fast=config.rope_beta_fast, beta_slow=config.rope_beta_slow,
                      attention_factor=config.rope_attention_factor)
    return {"rope_scaling": params}


def hf_config(config: Config) -> dict[str, Any]:
    if config.arch == "mamba":
        return hf_mamba_config(config)
    if config.arch == "encoder":
        return hf_bert_config(config)
    if config.arch == "encoder_decoder":
        return hf_t5_config(config)
    gemma = config.sandwich_norm
    cfg: dict[str, Any] = dict(
        model_type="gemma3_text" if gemma else "llama", architectures=["Gemma3ForCausalLM" if gemma else
                                                                          "LlamaForCausalLM"],
        vocab_size=config.vocab_size, hidden_size=config.n_embd, num_hidden_layers=config.n_layer,
        num_attention_heads=config.n_head, num_key_value_heads=config.n_kv_head, head_dim=config.head_dim,
        intermediate_size=config.intermediate_size, max_position_embeddings=config.block_size,
        rms_norm_eps=config.norm_eps, rope_theta=config.rope_theta, tie_word_embeddings=config.tie_embeddings,
        attention_bias=config.bias, torch_dtype="float32",
    )
    cfg.update(_hf_rope(config))
    if gemma:
        cfg.update(query_pre_attn_scalar=config.query_pre_attn_scalar, sliding_window=config.sliding_window,
                   rope_local_base_freq=config.rope_local_theta, hidden_activation="gelu_pytorch_tanh",
                   layer_types=["sliding_attention" if t == "sliding" else "full_attention"
                                for t in config.layer_types])
    if config.n_experts:
        cfg.update(hf_moe_fields(config))
    return cfg
