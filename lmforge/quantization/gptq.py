"""GPTQ: int4 weights chosen column by column, each rounding error compensated on the columns left.

Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers", https://arxiv.org/abs/2210.17323 (Algorithm 1). For the layer objective
||X W^T - X W_hat^T||^2 with H = 2 X^T X, quantizing column j and updating the remaining ones by
-(w_j - q_j) / [H^-1]_jj * [H^-1]_{j, j:} is optimal (OBS); the rows of the upper Cholesky factor
of H^-1 give those updates in order without re-inverting (section 4, step 3), and applying them to
later columns in blocks of 128 (lazy batch updates, step 2) is an exact reformulation.
Codes follow int4.py: w_hat = (q - 8) * scale + zero, one (scale, zero) per row and group.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor, nn

from lmforge.quantization.calibration import (Codes, LinearStats, StatsCollector, input_groups, named_linears,
                                              quantizable, run_blockwise, swap_in_int4, untie_lm_head,
                                              write_fake_quant)
from lmforge.quantization.int4 import check_group_size, group_params, n_groups, quantize_codes


@dataclass
class GPTQSettings:
    """GPTQ knobs, read from a QuantConfig by field name (missing fields keep these defaults)."""

    group_size: int = 128
    symmetric: bool = False
    act_order: bool = False  # columns in descending diag(H) order (the paper's "act-order" heuristic)
    damp: float = 0.01  # fraction of mean(diag H) added to the diagonal (paper: 1%)
    block_size: int = 128  # lazy-batch width (paper: 128)
    true_sequential: bool = True  # within a block, re-collect inputs after each group (q/k/v, o, gate/up, down)
    include_lm_head: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.damp <= 1.0:
            raise ValueError(f"damp={self.damp} must be in [0, 1] (a fraction of mean(diag H)); 0.01 is usual")
        if self.block_size < 1:
            raise ValueError(f"block_size={self.block_size} must be >= 1; 128 is usual")

    @classmethod
    def of(cls, config) -> "GPTQSettings":
        if config is None or isinstance(config, cls):
            return config or cls()
        return cls(**{f.name: getattr(config, f.name, f.default) for f in fields(cls)})


def _inverse_hessian_cholesky(H: Tensor, damp: float) -> Tensor:
    """Upper Cholesky factor U of (H + damp * mean(diag H) I)^-1, so that H^-1 = U^T U."""
    H = H.clone()
    H.diagonal().add_(damp * H.diagonal().mean())
    L, info = torch.linalg.cholesky_ex(H)
    if int(info):
        raise ValueError(f"the Hessian is not positive definite (damp={damp}); raise damp (e.g. 0.1) "
                         f"or calibrate on more tokens")
    return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)


def _static_groups(W: Tensor, group_size: int, symmetric: bool) -> tuple[Tensor, Tensor]:
    """scale, zero (N, G) of every original-order group of W (N, K), fixed before any update."""
    params = [group_params(W[:, j:j + group_size], symmetric) for j in range(0, W.shape[1], group_size)]
    return torch.stack([p[0] for p in params], 1), torch.stack([p[1] for p in params], 1)


def _block_width(settings_block: int, group_size: int, act_order: bool) -> int:
    """Lazy-batch width; without act_order a multiple of the group size, so a group never spans two
    blocks and its params see every update made before it (exactly as column-by-column GPTQ)."""
    if act_order:
        return settings_block
    return group_size * max(1, settings_block // group_size)


@torch.no_grad()
def gptq_quantize(w: Tensor, hessian: Tensor, group_size: int = 128, symmetric: bool = False,
                  damp: float = 0.01, act_order: bool = False, block_size: int = 128) -> Codes:
    """GPTQ codes of one weight matrix (Algorithm 1 with groups), computed in fp64.

    Args:
        w: (N, K) weight.
        hessian: (K, K) H = 2/n sum x x^T of the layer's inputs.
        act_order: quantize columns by descending diag(H); each column keeps its original group's
            scale/zero (static groups, computed from W before any update), so codes stay in the
            original order with contiguous groups.
    Returns:
        q uint8 (N, K) in 0..15, scale and zero fp32 (N, ceil(K / group_size)).
    """
    N, K = w.shape
    check_group_size(K, group_size)
    if tuple(hessian.shape) != (K, K):
        raise ValueError(f"hessian shape {tuple(hessian.shape)} must be ({K}, {K}) for weight {tuple(w.shape)}")
    W = w.detach().double().clone()
    H = hessian.detach().double().clone()
    dead = H.diagonal() == 0  # inputs that never fire: their weights cannot matter
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    G = n_groups(K, group_size)  # the last group is narrower when group_size does not divide K
    scale = torch.zeros(N, G, dtype=torch.float32, device=W.device)
    zero = torch.zeros_like(scale)
    perm = torch.arange(K, device=W.device)
    if act_order:
        scale, zero = _static_groups(W, group_size, symmetric)
        perm = torch.argsort(H.diagonal(), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    group_of = perm // group_size  # original group of each (permuted) column
    U = _inverse_hessian_cholesky(H, damp)
    Q = torch.zeros(N, K, dtype=torch.uint8, device=W.device)
    width = _block_width(block_size, group_size, act_order)
    for i1 in range(0, K, width):
        i2 = min(i1 + width, K)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            col = i1 + i
            if not act_order and col % group_size == 0:  # entering a group: params from the updated weights
                g = col // group_size
                scale[:, g], zero[:, g] = group_params(W1[:, i:i + group_size], symmetric)
            s, z = scale[:, group_of[col]], zero[:, group_of[col]]
            q = quantize_codes(W1[:, i:i + 1], s, z)[:, 0]
            Q[:, col] = q
            err = (W1[:, i] - ((q.double() - 8) * s.double() + z.double())) / U1[i, i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]  # OBS update of the block's remaining columns
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]  # lazy batch: the block's updates to all later columns at once
    Q = Q[:, torch.argsort(perm)]  # back to the original column order
    return Q, scale, zero


def _quantize_linears(prefix: str, linears: dict[str, nn.Linear], stats: dict[str, LinearStats],
                      settings: GPTQSettings, codes: dict[str, Codes]) -> None:
    """GPTQ each linear from its collected Hessian; the float weight becomes its fake-quant value."""
    for name, lin in linears.items():
        result = gptq_quantize(lin.weight, stats[name].hessian, settings.group_size, settings.symmetric,
                               settings.damp, settings.act_order, settings.block_size)
        write_fake_quant(lin, result, settings.group_size)
        codes[prefix + name] = result


def _block_quantizer(settings: GPTQSettings, codes: dict[str, Codes]):
    """quantize_block for run_blockwise: true-sequential groups, or all linears from one pass."""

    def quantize_block(prefix: str, block: nn.Module, forward) -> None:
        linears = named_linears(block)
        if settings.true_sequential:
            groups = input_groups(block, lambda: forward(1))
        else:
            groups = [list(linears)]
        for group in groups:
            chosen = {name: linears[name] for name in group}
            with StatsCollector(chosen) as collector:
                forward()
            _quantize_linears(prefix, chosen, collector.stats, settings, codes)

    return quantize_block


@torch.no_grad()
def quantize_gptq(model: nn.Module, calibration: list[Tensor], config=None) -> nn.Module:
    """Quantize every block linear (and lm_head unless include_lm_head=False) with GPTQ, in place.

    Args:
        model: a lmforge Transformer (float weights, on the CPU for Int4Linear's kernel).
        calibration: (1, T) LongTensor token batches; each block sees the quantized earlier blocks' outputs.
        config: a QuantConfig or GPTQSettings; fields read: group_size, symmetric, act_order, damp,
            block_size, true_sequential, include_lm_head.
    """
    settings = GPTQSettings.of(config)
    targets = dict(quantizable(model, settings.group_size, settings.include_lm_head))
    if "lm_head" in targets:
        untie_lm_head(model)
    codes: dict[str, Codes] = {}
    head_inputs = run_blockwise(model, calibration, _block_quantizer(settings, codes), desc="gptq")
    if "lm_head" in targets:
        stats = LinearStats(model.lm_head.in_features)
        for x in head_inputs:
            stats.add(x)
        _quantize_linears("", {"lm_head": model.lm_head}, {"lm_head": stats}, settings, codes)
    return swap_in_int4(model, codes, settings.group_size)
