"""AWQ: activation-aware int4 weights, salient input channels scaled up before rounding.

Lin et al. 2023, "AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration",
https://arxiv.org/abs/2306.00978. Channels with large mean |x| matter most; scaling weight column k
by s_k (and the input by 1/s_k) shrinks their relative rounding error. Section 3.2: s = mean|x|^alpha,
alpha searched on a grid in [0, 1) to minimise ||x W^T - (x / s) Q(W s)^T||^2; then the weight
range is clipped per group where that lowers the same error (the paper's clip search, skipped for
q/k as in the reference code). 1/s is folded exactly into the op before the linears: the RMSNorm
/LayerNorm weight before q/k/v (one shared s) and gate/up, the rows of v_proj before o_proj (s tied
across the query heads of a kv head under GQA), the rows of up_proj before down_proj, and the final
norm before lm_head. So the result is plain Int4Linear layers plus changed norm/linear weights,
and the state_dict has no extra keys. A GELU MLP's down_proj has no exact fold: it gets s = 1.
Losses use the input Gram matrix C = X^T X over every calibration row: ||X D^T||^2 = sum(D C * D).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor, nn

from lmforge.model.mlp import GatedMLP
from lmforge.quantization.calibration import (Codes, LinearStats, StatsCollector, named_linears, quantizable,
                                              run_blockwise, swap_in_int4, untie_lm_head, write_fake_quant)
from lmforge.quantization.int4 import (dequantize_int4, group_params, n_groups, pad_columns, quantize_codes,
                                       quantize_rtn)


@dataclass
class AWQSettings:
    """AWQ knobs, read from a QuantConfig by field name (missing fields keep these defaults)."""

    group_size: int = 128
    symmetric: bool = False
    awq_grid: int = 20  # alphas 0, 1/grid, ..., (grid - 1)/grid (paper and reference: 20)
    awq_clip: bool = True  # search a per-group range shrink (reference: down to 0.5 in 20 steps)
    include_lm_head: bool = True

    def __post_init__(self) -> None:
        if self.awq_grid < 1:
            raise ValueError(f"awq_grid={self.awq_grid} must be >= 1 (1 means alpha = 0: plain round-to-nearest)")

    @classmethod
    def of(cls, config) -> "AWQSettings":
        if config is None or isinstance(config, cls):
            return config or cls()
        return cls(**{f.name: getattr(config, f.name, f.default) for f in fields(cls)})


@dataclass
class ScaleGroup:
    """Linears sharing one input, and the op before them whose output channels absorb 1/s exactly."""

    names: list[str]
    prev: nn.Module | None  # a norm (weight, bias) or a linear (rows); None: no exact fold, s = 1
    tie: Tensor | None = None  # (K,) prev's output channel feeding each input channel (GQA); None: identity


def _gqa_tie(attn: nn.Module) -> Tensor:
    """o_proj input channel (h, d) reads v_proj channel (h // groups, d): heads share their kv head's value."""
    groups = attn.n_head // attn.n_kv_head
    heads = torch.arange(attn.n_head)[:, None] // groups * attn.head_dim
    return (heads + torch.arange(attn.head_dim)[None, :]).reshape(-1)


def block_scale_groups(block: nn.Module) -> list[ScaleGroup]:
    """The scale groups of one transformer Block, in forward order."""
    attn, mlp = block.self_attn, block.mlp
    mlp_norm = block.pre_feedforward_layernorm if block.sandwich else block.post_attention_layernorm
    groups = [ScaleGroup(["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], block.input_layernorm),
              ScaleGroup(["self_attn.o_proj"], attn.v_proj, _gqa_tie(attn))]
    if isinstance(mlp, GatedMLP):
        return groups + [ScaleGroup(["mlp.gate_proj", "mlp.up_proj"], mlp_norm),
                         ScaleGroup(["mlp.down_proj"], mlp.up_proj)]
    return groups + [ScaleGroup(["mlp.up_proj"], mlp_norm), ScaleGroup(["mlp.down_proj"], None)]


def output_error(D: Tensor, gram: Tensor) -> Tensor:
    """||X D^T||^2 = sum_n d_n C d_n^T for a weight error D (N, K) and C = X^T X (K, K)."""
    return ((D @ gram) * D).sum()


def fake_rtn(w: Tensor, group_size: int, symmetric: bool) -> Tensor:
    """Round-to-nearest int4 of w, dequantized (fp32)."""
    return dequantize_int4(*quantize_rtn(w, group_size, symmetric), group_size)


def candidate_scale(abs_mean: Tensor, alpha: float) -> Tensor:
    """s = mean|x|^alpha, normalised by sqrt(max * min) (the reference code's choice); alpha 0 gives 1."""
    s = abs_mean.float().pow(alpha).clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


def search_scale(weights: list[Tensor], gram: Tensor, abs_mean: Tensor, group_size: int = 128,
                 symmetric: bool = False, grid: int = 20) -> tuple[Tensor, float]:
    """The per-input-channel scale s (K,) and its alpha minimising sum_W ||X (W - Q(W s) / s)^T||^2.

    Args:
        weights: (N_i, K) weights sharing one input; gram: (K, K) X^T X; abs_mean: (K,) mean |x|.
    """
    gram = gram.float()
    best: tuple[float, Tensor, float] | None = None
    for i in range(grid):
        alpha = i / grid
        s = candidate_scale(abs_mean, alpha)
        err = sum(float(output_error(w.float() - fake_rtn(w.float() * s, group_size, symmetric) / s, gram))
                  for w in weights)
        if best is None or err < best[0]:
            best = (err, s, alpha)
    return best[1], best[2]


def clip_codes(w: Tensor, gram: Tensor, group_size: int = 128, symmetric: bool = False, grid: int = 20,
               max_shrink: float = 0.5) -> Codes:
    """Codes of w (N, K) with each (row, group) range shrunk by the r in {1, 1 - 1/grid, ..., 1 - max_shrink}
    minimising that group's output error x_g (w_g - Q_r(w_g))^T on the Gram matrix's diagonal block."""
    N, K = w.shape
    G = n_groups(K, group_size)
    pad = G * group_size - K  # a ragged last group: padded columns copy the last one and get zero Gram weight
    wg = pad_columns(w.detach().float(), G * group_size).reshape(N, G, group_size)
    gram = torch.nn.functional.pad(gram.float(), (0, pad, 0, pad))
    blocks = torch.stack([gram[j * group_size:(j + 1) * group_size, j * group_size:(j + 1) * group_size]
                          for j in range(G)])  # (G, g, g)
    hi = wg.abs().amax(-1, keepdim=True) if symmetric else wg.amax(-1, keepdim=True)
    lo = -hi if symmetric else wg.amin(-1, keepdim=True)
    best_err = torch.full((N, G), float("inf"), device=w.device)
    best_scale, best_zero = torch.zeros(N, G, device=w.device), torch.zeros(N, G, device=w.device)
    flat = wg.reshape(N * G, group_size)
    for i in range(int(round(grid * max_shrink)) + 1):
        r = 1.0 - i / grid
        scale, zero = group_params(wg.clamp(lo * r, hi * r).reshape(N * G, group_size), symmetric)
        q = quantize_codes(flat, scale, zero).float()
        d = (wg - ((q - 8) * scale[:, None] + zero[:, None]).view(N, G, group_size))
        err = torch.einsum("njg,jgh,njh->nj", d, blocks, d)  # (N, G)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale.view(N, G), best_scale)
        best_zero = torch.where(better, zero.view(N, G), best_zero)
    q = quantize_codes(flat, best_scale.reshape(-1), best_zero.reshape(-1)).view(N, G * group_size)
    return q[:, :K].contiguous(), best_scale, best_zero


def _fold(prev: nn.Module, s: Tensor) -> None:
    """Divide prev's output channels by s (exact: its outputs are the next linears' inputs)."""
    if isinstance(prev, nn.Linear):
        prev.weight.data.div_(s[:, None].to(prev.weight.dtype))
    elif getattr(prev, "unit_offset", False):  # Gemma RMSNorm: y = x_hat * (1 + w)
        prev.weight.data.copy_((1.0 + prev.weight.float()) / s - 1.0)
    else:
        prev.weight.data.div_(s.to(prev.weight.dtype))
    if getattr(prev, "bias", None) is not None:
        prev.bias.data.div_(s.to(prev.bias.dtype))


def apply_scale(group: ScaleGroup, linears: dict[str, nn.Linear], s: Tensor) -> None:
    """W <- W diag(s) for the group's linears and prev's outputs <- outputs / s: the float function is unchanged."""
    s_prev = s if group.tie is None else torch.empty(int(group.tie.max()) + 1, device=s.device).scatter_(
        0, group.tie.to(s.device), s)
    _fold(group.prev, s_prev)
    for name in group.names:
        linears[name].weight.data.mul_(s[None, :].to(linears[name].weight.dtype))


def _tied_abs_mean(abs_mean: Tensor, tie: Tensor | None) -> Tensor:
    """Mean |x| averaged over the input channels that must share one scale (GQA), per input channel."""
    if tie is None:
        return abs_mean
    tie = tie.to(abs_mean.device)
    total = torch.zeros(int(tie.max()) + 1, device=abs_mean.device).index_add_(0, tie, abs_mean)
    count = torch.zeros_like(total).index_add_(0, tie, torch.ones_like(abs_mean))
    return (total / count)[tie]


def _scale_and_quantize(prefix: str, groups: list[ScaleGroup], linears: dict[str, nn.Linear],
                        stats: dict[str, LinearStats], settings: AWQSettings, codes: dict[str, Codes]) -> None:
    """Search and fold every group's scale, then quantize each linear (clip search or RTN)."""
    input_scale: dict[str, Tensor] = {}
    for group in groups:
        if group.prev is None:
            continue
        first = stats[group.names[0]]
        abs_mean = _tied_abs_mean(first.abs_mean, group.tie)
        s, _ = search_scale([linears[n].weight for n in group.names], first.hessian, abs_mean,
                            settings.group_size, settings.symmetric, settings.awq_grid)
        apply_scale(group, linears, s)
        input_scale.update((n, s) for n in group.names)
    for name, lin in linears.items():
        if settings.awq_clip and not name.endswith(("q_proj", "k_proj")):
            gram = stats[name].hessian.float()
            if name in input_scale:  # the input is now x / s
                s = input_scale[name]
                gram = gram / (s[:, None] * s[None, :])
            result = clip_codes(lin.weight, gram, settings.group_size, settings.symmetric)
        else:
            result = quantize_rtn(lin.weight, settings.group_size, settings.symmetric)
        write_fake_quant(lin, result, settings.group_size)
        codes[prefix + name] = result


def _block_quantizer(settings: AWQSettings, codes: dict[str, Codes]):
    """quantize_block for run_blockwise: one statistics pass over the block, then scale, fold, quantize."""

    def quantize_block(prefix: str, block: nn.Module, forward) -> None:
        linears = named_linears(block)
        with StatsCollector(linears) as collector:
            forward()
        _scale_and_quantize(prefix, block_scale_groups(block), linears, collector.stats, settings, codes)

    return quantize_block


@torch.no_grad()
def quantize_awq(model: nn.Module, calibration: list[Tensor], config=None) -> nn.Module:
    """Quantize every block linear (and lm_head unless include_lm_head=False) with AWQ, in place.

    Args:
        model: a lmforge Transformer (float weights, on the CPU for Int4Linear's kernel).
        calibration: (1, T) LongTensor token batches; each block sees the quantized earlier blocks' outputs.
        config: a QuantConfig or AWQSettings; fields read: group_size, symmetric, awq_grid, awq_clip,
            include_lm_head.
    """
    settings = AWQSettings.of(config)
    targets = dict(quantizable(model, settings.group_size, settings.include_lm_head))
    if "lm_head" in targets:
        untie_lm_head(model)
    codes: dict[str, Codes] = {}
    head_inputs = run_blockwise(model, calibration, _block_quantizer(settings, codes), desc="awq")
    if "lm_head" in targets:
        stats = LinearStats(model.lm_head.in_features)
        for x in head_inputs:
            stats.add(x)
        _scale_and_quantize("", [ScaleGroup(["lm_head"], model.model.norm)], {"lm_head": model.lm_head},
                            {"lm_head": stats}, settings, codes)
    return swap_in_int4(model, codes, settings.group_size)
