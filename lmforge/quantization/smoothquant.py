"""SmoothQuant: move activation outliers into the weights before int8 W8A8 quantization, exactly.

Xiao et al. 2022, "SmoothQuant: Accurate and Efficient Post-Training Quantization for Large Language
Models", https://arxiv.org/abs/2211.10438. Per input channel j of a group of linears that share one
input X, s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) (eq. 4; X over calibration tokens, W over the
output rows of every linear in the group); then X' = X / s and W' = W * s leave X W^T unchanged while
flattening X's per-tensor range. The 1/s is folded into the op that produces X, so nothing runs at
inference time:
- q/k/v_proj: into input_layernorm (weight, and a LayerNorm's bias);
- gate/up_proj (up_proj alone for a GELU MLP): into the norm before the MLP (post_attention_layernorm,
  Gemma's pre_feedforward_layernorm);
- down_proj of a gated MLP (input act(gate) * up): into up_proj's rows (and bias);
- o_proj (input: attention output, head h from kv head h // group): into v_proj's rows, with s shared
  by the query heads of a kv group (the group's max statistic);
- lm_head (optional): into the final norm, after untying it from the embedding.
A GELU MLP's down_proj (input gelu(up)) cannot be folded and is left as it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lmforge.model.linear import is_plain_linear
from lmforge.model.norm import RMSNorm
from lmforge.model.transformer import Transformer
from lmforge.quantization.calibration import check_calibration, untie_lm_head

EPS = 1e-5  # floor on max|X| and max|W| (and on s) so a dead channel gives a finite scale, as in the paper's code


@dataclass
class SmoothGroup:
    """Linears sharing one input, and where that input's 1/s is folded (a norm, or a linear's rows)."""

    linears: list[str]  # qualified names; the first one's input is observed
    source: str  # qualified name of the norm or the linear whose output rows feed the group
    kv_groups: int = 1  # o_proj: query heads per kv head (s repeated over them); 1 elsewhere
    head_dim: int = 0  # o_proj: channels per head


def smooth_scales(act_max: Tensor, weights: list[Tensor], alpha: float) -> Tensor:
    """s (K,) = max|X|^alpha / max|W|^(1 - alpha), max|W| over the rows of every weight (N_i, K).

    Args:
        act_max: (K,) max |x_j| over the calibration tokens.
        weights: the (N_i, K) weights of the linears that read x.
        alpha: migration strength in [0, 1]; 0 normalises the weight columns, 1 the activations.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha} must be in [0, 1] (0.5 is the paper's default)")
    w_max = torch.stack([w.detach().float().abs().amax(dim=0) for w in weights]).amax(dim=0)
    x_max = act_max.float().clamp(min=EPS)
    return (x_max.pow(alpha) / w_max.clamp(min=EPS).pow(1.0 - alpha)).clamp(min=EPS)


def smooth_groups(model: Transformer, include_lm_head: bool = False) -> list[SmoothGroup]:
    """Every foldable group of the model's linears, block by block (see the module docstring)."""
    cfg = model.config
    groups: list[SmoothGroup] = []
    for i, block in enumerate(model.model.layers):
        p = f"model.layers.{i}."
        mlp_norm = "pre_feedforward_layernorm" if block.sandwich else "post_attention_layernorm"
        gated = hasattr(block.mlp, "gate_proj")
        groups.append(SmoothGroup([p + f"self_attn.{n}_proj" for n in "qkv"], p + "input_layernorm"))
        groups.append(SmoothGroup([p + "self_attn.o_proj"], p + "self_attn.v_proj",
                                  cfg.n_head // cfg.n_kv_head, block.self_attn.head_dim))
        mlp = ["gate_proj", "up_proj"] if gated else ["up_proj"]
        groups.append(SmoothGroup([p + f"mlp.{n}" for n in mlp], p + mlp_norm))
        if gated:
            groups.append(SmoothGroup([p + "mlp.down_proj"], p + "mlp.up_proj"))
    if include_lm_head:
        groups.append(SmoothGroup(["lm_head"], "model.norm"))
    return groups


@torch.no_grad()
def activation_max(model: Transformer, names: list[str], calibration: list[Tensor]) -> dict[str, Tensor]:
    """max |x_j| per input channel (K,) of each named linear over every calibration token."""
    check_calibration(calibration)
    stats: dict[str, Tensor] = {}

    def hook(name: str):
        def fn(_module, args):
            x = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(dim=0).float()
            stats[name] = x if name not in stats else torch.maximum(stats[name], x)
        return fn

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    device = next(model.parameters()).device
    try:
        for batch in calibration:
            model(batch.to(device))
    finally:
        for handle in handles:
            handle.remove()
    return stats


def _check_linears(model: Transformer, group: SmoothGroup) -> list[nn.Linear]:
    linears = [model.get_submodule(n) for n in group.linears]
    for name, lin in zip(group.linears, linears):
        if not is_plain_linear(lin):
            raise ValueError(f"{name} is a {type(lin).__name__}; smooth the float model before quantizing it")
    return linears


def _shared_over_kv_heads(per_channel: Tensor, group: SmoothGroup) -> Tensor:
    """(n_head * hd,) -> (n_kv * hd,): the max over the query heads that read one kv head."""
    return per_channel.view(-1, group.kv_groups, group.head_dim).amax(dim=1).reshape(-1)


def _fold_into_source(model: Transformer, source: str, s: Tensor) -> None:
    """Divide the output channels of `source` (a norm, or a linear's rows and bias) by s, in place."""
    module = model.get_submodule(source)
    s = s.to(module.weight.dtype)
    if isinstance(module, RMSNorm) and module.unit_offset:  # y = x_hat * (1 + w): want (1 + w') = (1 + w) / s
        module.weight.add_(1.0).div_(s).sub_(1.0)
    elif isinstance(module, (RMSNorm, nn.LayerNorm)):
        module.weight.div_(s)
    elif is_plain_linear(module):
        module.weight.div_(s[:, None])
    else:
        raise ValueError(f"{source} is a {type(module).__name__}; cannot fold a smoothing scale into it")
    if getattr(module, "bias", None) is not None:
        module.bias.div_(s)


@torch.no_grad()
def smooth_group(model: Transformer, group: SmoothGroup, act_max: Tensor, alpha: float) -> Tensor:
    """Fold one group's scales into its source and its linears' columns; returns s per input channel."""
    linears = _check_linears(model, group)
    if group.kv_groups > 1:  # o_proj: one s per (kv head, dim), repeated over that kv head's query heads
        w_max = _shared_over_kv_heads(linears[0].weight.detach().abs().amax(dim=0), group)
        s_kv = smooth_scales(_shared_over_kv_heads(act_max, group), [w_max[None]], alpha)
        s = s_kv.view(-1, 1, group.head_dim).expand(-1, group.kv_groups, -1).reshape(-1)
        _fold_into_source(model, group.source, s_kv)
    else:
        s = smooth_scales(act_max, [lin.weight for lin in linears], alpha)
        _fold_into_source(model, group.source, s)
    for lin in linears:
        lin.weight.mul_(s.to(lin.weight.dtype)[None, :])  # in place: a column-major weight stays so
    return s


@torch.no_grad()
def smooth_model(model: Transformer, calibration: list[Tensor], alpha: float = 0.5,
                 include_lm_head: bool = False) -> dict[str, Tensor]:
    """Apply SmoothQuant to a float model in place (its function is unchanged); returns s per group.

    Args:
        model: a float Transformer whose linears are still nn.Linear.
        calibration: list of (1, T) LongTensor token batches whose activations set max|X|.
        alpha: migration strength in [0, 1].
        include_lm_head: also smooth lm_head via the final norm (unties a tied lm_head from the embedding).
    Returns:
        the first linear's name of each group -> s (K,) applied to its input channels.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha} must be in [0, 1] (0.5 is the paper's default)")
    groups = smooth_groups(model, include_lm_head)
    for group in groups:
        _check_linears(model, group)
    stats = activation_max(model, [g.linears[0] for g in groups], calibration)
    if include_lm_head:
        untie_lm_head(model)
    return {g.linears[0]: smooth_group(model, g, stats[g.linears[0]], alpha) for g in groups}
