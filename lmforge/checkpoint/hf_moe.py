"""Mixture-of-Experts checkpoints in the Hugging Face layout: Mixtral and Qwen2-MoE (Qwen1.5-MoE).

On the hub each expert is three matrices: Mixtral `block_sparse_moe.experts.E.w1/w3/w2` (gate,
up, down), Qwen2-MoE `mlp.experts.E.gate_proj/up_proj/down_proj`; transformers 5 stacks them in
memory as `mlp.experts.gate_up_proj` (E, 2I, H) and `mlp.experts.down_proj` (E, H, I), and so
does lmforge. Reading accepts both layouts; writing gives the hub's per-expert one.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from lmforge.checkpoint.errors import CheckpointError
from lmforge.config import Config

MOE_TYPES = ("mixtral", "qwen2_moe")
# per-expert tensor name on the hub -> its part of a SwiGLU expert
EXPERT_PARTS = {"w1": "gate", "w3": "up", "w2": "down", "gate_proj": "gate", "up_proj": "up", "down_proj": "down"}
_EXPERT_KEY = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(\w+)\.weight$")


def moe_fields(cfg: dict[str, Any], kind: str) -> dict[str, Any]:
    """Config fields of a Mixtral or Qwen2-MoE config.json (beyond the LLaMA ones)."""
    if kind == "mixtral":  # transformers' Mixtral always renormalises the top-k weights
        return dict(n_experts=cfg["num_local_experts"], n_experts_per_tok=cfg["num_experts_per_tok"],
                    moe_intermediate_size=cfg["intermediate_size"], norm_topk_prob=True,
                    router_aux_loss_coef=cfg.get("router_aux_loss_coef", 0.0))
    out = dict(n_experts=cfg["num_experts"], n_experts_per_tok=cfg["num_experts_per_tok"],
               moe_intermediate_size=cfg["moe_intermediate_size"],
               shared_expert_intermediate_size=cfg["shared_expert_intermediate_size"],
               norm_topk_prob=cfg.get("norm_topk_prob", False), qkv_bias=cfg.get("qkv_bias", True),
               router_aux_loss_coef=cfg.get("router_aux_loss_coef", 0.0),
               moe_step=cfg.get("decoder_sparse_step", 1), dense_layers=list(cfg.get("mlp_only_layers") or []),
               sliding_window=None, sliding_window_pattern=0)
    if cfg.get("use_sliding_window") and cfg.get("sliding_window"):  # only then does Qwen2 slide
        types = cfg.get("layer_types") or [
            "sliding_attention" if (i + 1) % 2 and i < cfg.get("max_window_layers", 0) else "full_attention"
            for i in range(cfg["num_hidden_layers"])]
        out.update(sliding_window=cfg["sliding_window"],
                   layer_types=["sliding" if t == "sliding_attention" else "global" for t in types])
    return out


def stack_experts(raw: dict[str, torch.Tensor], config: Config) -> dict[str, torch.Tensor]:
    """Hub tensors under lmforge's names: `block_sparse_moe` -> `mlp`, per-expert matrices stacked
    into gate_up_proj (E, 2I, H) and down_proj (E, H, I); already stacked ones pass as they are."""
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[tuple[str, int], torch.Tensor]] = {}
    for key in list(raw):
        name = key.replace(".block_sparse_moe.", ".mlp.")
        match = _EXPERT_KEY.match(name)
        if match is None:
            out[name] = raw.pop(key)
            continue
        prefix, e, part = match.group(1), int(match.group(2)), EXPERT_PARTS.get(match.group(3))
        if part is None or e >= config.n_experts:
            raise CheckpointError(f"unexpected expert tensor {key!r}: the config has {config.n_experts} experts "
                                  f"of {sorted(EXPERT_PARTS)}")
        experts.setdefault(prefix, {})[part, e] = raw.pop(key)
    for prefix, parts in experts.items():
        missing = [f"{prefix}.{e}.{p}" for e in range(config.n_experts) for p in ("gate", "up", "down")
                   if (p, e) not in parts]
        if missing:
            raise CheckpointError(f"expert tensors missing: {missing[:4]} (a shard not downloaded?)")
        out[f"{prefix}.gate_up_proj"] = torch.stack(
            [torch.cat([parts["gate", e], parts["up", e]]) for e in range(config.n_experts)])
        out[f"{prefix}.down_proj"] = torch.stack([parts["down", e] for e in range(config.n_experts)])
    return out


def unstack_experts(state: dict[str, torch.Tensor], config: Config) -> dict[str, torch.Tensor]:
    """lmforge's stacked experts as the hub's per-expert matrices (Mixtral names for a Mixtral)."""
    mixtral = hf_moe_fields(config)["model_type"] == "mixtral"  # also refuses what transformers cannot run
    names = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        block = key.replace(".mlp.", ".block_sparse_moe.") if mixtral else key
        if key.endswith(".mlp.experts.gate_up_proj"):
            gate, up = tensor.chunk(2, dim=1)  # (E, I, H) each
            for e in range(tensor.shape[0]):
                out[f"{block.removesuffix('gate_up_proj')}{e}.{names[0]}.weight"] = gate[e].contiguous()
                out[f"{block.removesuffix('gate_up_proj')}{e}.{names[1]}.weight"] = up[e].contiguous()
        elif key.endswith(".mlp.experts.down_proj"):
            for e in range(tensor.shape[0]):
                out[f"{block.removesuffix('down_proj')}{e}.{names[2]}.weight"] = tensor[e].contiguous()
        else:
            out[block] = tensor
    return out


def hf_model_type(config: Config) -> str:
    """mixtral for a plain renormalising MoE, qwen2_moe for one with a shared expert."""
    if config.shared_expert_intermediate_size:
        return "qwen2_moe"
    if config.norm_topk_prob and config.moe_step == 1 and not config.dense_layers and not config.qkv_bias:
        return "mixtral"
    raise ValueError("this MoE has no shared expert (Qwen2-MoE always has one) but is not Mixtral-shaped "
                     "(Mixtral: norm_topk_prob, every layer MoE, no q/k/v bias); transformers has no class for it")


def hf_moe_fields(config: Config) -> dict[str, Any]:
    """The config.json keys that make a LLaMA-style config a Mixtral or Qwen2-MoE one."""
    kind = hf_model_type(config)
    if config.capacity_factor is not None:
        raise ValueError(f"capacity_factor={config.capacity_factor}: transformers' {kind} never drops tokens; "
                         "set it to None before exporting")
    common = dict(model_type=kind, num_experts_per_tok=config.n_experts_per_tok, output_router_logits=False,
                  router_aux_loss_coef=config.router_aux_loss_coef, hidden_act="silu")
    if kind == "mixtral":
        return dict(common, architectures=["MixtralForCausalLM"], num_local_experts=config.n_experts,
                    intermediate_size=config.moe_intermediate_size, sliding_window=config.sliding_window)
    if config.sliding_window:
        raise ValueError("exporting a sliding-window Qwen2-MoE is not supported; set sliding_window=None")
    return dict(common, architectures=["Qwen2MoeForCausalLM"], num_experts=config.n_experts,
                moe_intermediate_size=config.moe_intermediate_size, norm_topk_prob=config.norm_topk_prob,
                shared_expert_intermediate_size=config.shared_expert_intermediate_size,
                decoder_sparse_step=config.moe_step, mlp_only_layers=config.dense_layers,
                qkv_bias=config.qkv_bias, use_sliding_window=False)
