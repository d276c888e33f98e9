"""Magnitude pruning: zero the smallest-|w| weights of the block linears, per matrix or globally.

Han et al. 2015, "Learning both Weights and Connections for Efficient Neural Networks",
https://arxiv.org/abs/1506.02626. The count of zeroed weights is exactly round(sparsity * n)
(per matrix, or over all targeted matrices together): ties at the threshold are broken in a
fixed order (matrices in module order, then row-major index within a matrix), so a run is
reproducible and its sparsity is the requested one, not "at least" it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class PruneConfig:
    """What to prune and how much: method, fraction of weights zeroed, scope, target linear names."""

    method: Literal["magnitude"] = "magnitude"
    sparsity: float = 0.5
    scope: Literal["layer", "global"] = "layer"  # layer: each matrix to `sparsity`; global: one threshold
    targets: list[str] = field(default_factory=lambda: list(BLOCK_LINEARS))  # last name component of a linear

    def __post_init__(self) -> None:
        if self.method != "magnitude":
            raise ValueError(f"prune method={self.method!r} is not supported; use 'magnitude'")
        if not 0.0 <= self.sparsity <= 1.0:
            raise ValueError(f"prune sparsity={self.sparsity} must be in [0, 1] (fraction of weights zeroed)")
        if self.scope not in ("layer", "global"):
            raise ValueError(f"prune scope={self.scope!r} must be 'layer' or 'global'")
        self.targets = list(self.targets)
        if not self.targets:
            raise ValueError(f"prune targets is empty; name linears such as {list(BLOCK_LINEARS)}")


def target_linears(model: nn.Module, targets: list[str] | tuple[str, ...] = BLOCK_LINEARS) -> dict[str, nn.Linear]:
    """The nn.Linear modules whose last name component is in `targets`, in module order."""
    wanted = set(targets)
    found = {name: m for name, m in model.named_modules()
             if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in wanted}
    if not found:
        raise ValueError(f"no nn.Linear matches targets={sorted(wanted)}; the block linears are named "
                         f"{list(BLOCK_LINEARS)} (lm_head is the output projection)")
    return found


def smallest_masks(magnitudes: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    """Boolean masks marking exactly the k smallest entries over all tensors together.

    Entries below the k-th smallest value are all marked; of those equal to it, the first ones
    in order (tensor by tensor, row-major within each) fill the count to exactly k.
    """
    flat = [m.detach().reshape(-1) for m in magnitudes]
    flat = [f if f.dtype in (torch.float32, torch.float64) else f.float() for f in flat]  # half types: exact in fp32
    n = sum(f.numel() for f in flat)
    if not 0 <= k <= n:
        raise ValueError(f"cannot select k={k} of {n} entries")
    if k == 0:
        return [torch.zeros(m.shape, dtype=torch.bool, device=m.device) for m in magnitudes]
    threshold = torch.kthvalue(torch.cat(flat), k).values.item()
    ties_left = k - sum(int((f < threshold).sum()) for f in flat)
    masks = []
    for f, m in zip(flat, magnitudes):
        mask = f < threshold
        tie_index = (f == threshold).nonzero().squeeze(1)[:max(ties_left, 0)]
        mask[tie_index] = True
        ties_left -= tie_index.numel()
        masks.append(mask.view(m.shape))
    assert ties_left == 0 and sum(int(x.sum()) for x in masks) == k
    return masks


def prune_count(sparsity: float, n: int) -> int:
    """Weights to zero among n: Python's round(sparsity * n) (half to even)."""
    return min(n, round(sparsity * n))


@torch.no_grad()
def magnitude_prune(model: nn.Module, config: PruneConfig) -> dict:
    """Zero the smallest-magnitude weights of the target linears in place; return `sparsity(model)`.

    Biases are never pruned. The report adds the requested sparsity and scope.
    """
    linears = target_linears(model, config.targets)
    weights = [m.weight for m in linears.values()]
    if config.scope == "global":
        total = sum(w.numel() for w in weights)
        masks = smallest_masks([w.abs() for w in weights], prune_count(config.sparsity, total))
    else:
        masks = [smallest_masks([w.abs()], prune_count(config.sparsity, w.numel()))[0] for w in weights]
    for w, mask in zip(weights, masks):
        w.masked_fill_(mask, 0.0)  # in place: keeps the (possibly column-major) strides
    report = sparsity(model, config.targets)
    report.update(requested=config.sparsity, scope=config.scope)
    return report


@torch.no_grad()
def sparsity(model: nn.Module, targets: list[str] | tuple[str, ...] = BLOCK_LINEARS) -> dict:
    """Fraction of exact zeros per target weight matrix and over all of them.

    Returns {"matrices": {name: fraction}, "zeros": int, "numel": int, "total": fraction}.
    """
    matrices, zeros, numel = {}, 0, 0
    for name, module in target_linears(model, targets).items():
        z = int((module.weight == 0).sum())
        matrices[name] = z / module.weight.numel()
        zeros += z
        numel += module.weight.numel()
    return {"matrices": matrices, "zeros": zeros, "numel": numel, "total": zeros / numel}
