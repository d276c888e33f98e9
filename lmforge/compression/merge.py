"""Model merging over state_dicts of one architecture: averaging, soups, task arithmetic, TIES.

- Weighted averaging / uniform soup: sum_i w_i theta_i with non-negative weights normalised to 1.
- Greedy soup (Wortsman et al. 2022, "Model soups", https://arxiv.org/abs/2203.05482): models
  sorted by their own score, each added to the soup only if the averaged soup scores higher.
- Task arithmetic (Ilharco et al. 2022, "Editing Models with Task Arithmetic",
  https://arxiv.org/abs/2212.04089): base + sum_i lambda_i (theta_i - base).
- TIES (Yadav et al. 2023, "TIES-Merging", https://arxiv.org/abs/2306.01708): trim each task
  vector to its top-k% magnitudes, elect a sign per parameter from the summed trimmed values,
  average only the values agreeing with it (disjoint mean), then base + lambda * merged.

Float tensors are combined in float64 and cast back to the first model's dtype (so averaging
copies of one model, or base + (ft - base), gives the inputs back bit for bit); non-float
tensors (integer buffers) must be equal across models and are copied.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal, Mapping, Sequence

import torch
from torch import nn

from lmforge.compression.prune import smallest_masks

State = Mapping[str, torch.Tensor]
Source = State | nn.Module


@dataclass
class MergeConfig:
    """Which merge and its coefficients."""

    method: Literal["average", "task_arithmetic", "ties"] = "average"
    weights: list[float] | None = None  # average: one per model, normalised; None -> uniform soup
    lambdas: list[float] | None = None  # task_arithmetic: one per fine-tuned model; None -> 1.0 each
    density: float = 0.2  # ties: fraction of each task vector's entries kept (top-k% by magnitude)
    scale: float = 1.0  # ties: lambda applied to the merged task vector

    def __post_init__(self) -> None:
        if self.method not in ("average", "task_arithmetic", "ties"):
            raise ValueError(f"merge method={self.method!r} must be 'average', 'task_arithmetic' or 'ties'")
        if not 0.0 < self.density <= 1.0:
            raise ValueError(f"merge density={self.density} must be in (0, 1] (fraction of task-vector entries kept)")


def as_state(source: Source) -> dict[str, torch.Tensor]:
    """A state_dict of detached tensors from a model or a mapping."""
    state = source.state_dict() if isinstance(source, nn.Module) else source
    return {k: v.detach() for k, v in state.items()}


def check_compatible(states: Sequence[State], names: Sequence[str] | None = None) -> None:
    """ValueError naming the first key or shape where a state differs from the first one."""
    names = list(names) if names is not None else [f"model {i}" for i in range(len(states))]
    ref = states[0]
    for state, name in zip(states[1:], names[1:]):
        for key, tensor in ref.items():
            if key not in state:
                raise ValueError(f"{name} lacks {key!r}, which {names[0]} has; merging needs one architecture")
            if tuple(state[key].shape) != tuple(tensor.shape):
                raise ValueError(f"{key!r} has shape {tuple(state[key].shape)} in {name} but {tuple(tensor.shape)} "
                                 f"in {names[0]}; merging needs one architecture")
            if state[key].is_floating_point() != tensor.is_floating_point():
                raise ValueError(f"{key!r} is {state[key].dtype} in {name} but {tensor.dtype} in {names[0]}")
        extra = next((k for k in state if k not in ref), None)
        if extra is not None:
            raise ValueError(f"{name} has {extra!r}, which {names[0]} lacks; merging needs one architecture")


def _prepare(sources: Sequence[Source], names: Sequence[str] | None = None) -> list[dict[str, torch.Tensor]]:
    if not sources:
        raise ValueError("nothing to merge: pass at least one model or state_dict")
    states = [as_state(s) for s in sources]
    check_compatible(states, names)
    return states


def _combine(states: list[dict[str, torch.Tensor]], fn: Callable[[list[torch.Tensor]], torch.Tensor]
             ) -> dict[str, torch.Tensor]:
    """fn over each float key's float64 tensors (cast back to the first dtype); non-floats must agree."""
    out = {}
    for key, ref in states[0].items():
        tensors = [s[key] for s in states]
        if not ref.is_floating_point():
            bad = next((i for i, t in enumerate(tensors) if not torch.equal(t, ref)), None)
            if bad is not None:
                raise ValueError(f"non-float tensor {key!r} differs between model 0 and model {bad}; "
                                 "integer buffers cannot be averaged, they must be equal")
            out[key] = ref.clone()
            continue
        out[key] = fn([t.to(torch.float64) for t in tensors]).to(ref.dtype)
    return out


def _weights(weights: Sequence[float] | None, n: int) -> list[float]:
    if weights is None:
        return [1.0 / n] * n
    weights = [float(w) for w in weights]
    if len(weights) != n:
        raise ValueError(f"{len(weights)} merge weights for {n} models; give one weight per model")
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"merge weights {weights} must be finite, non-negative and not all zero")
    total = sum(weights)
    return [w / total for w in weights]


def weighted_average(sources: Sequence[Source], weights: Sequence[float] | None = None) -> dict[str, torch.Tensor]:
    """sum_i w_i theta_i with the weights normalised to sum to 1 (None: the uniform soup)."""
    states = _prepare(sources)
    w = _weights(weights, len(states))
    return _combine(states, lambda ts: sum(wi * t for wi, t in zip(w, ts)))


def uniform_soup(sources: Sequence[Source]) -> dict[str, torch.Tensor]:
    """The uniform model soup: the plain average of every model."""
    return weighted_average(sources)


def greedy_soup(sources: Sequence[Source], evaluate: Callable[[dict[str, torch.Tensor]], float]
                ) -> tuple[dict[str, torch.Tensor], list[int]]:
    """Greedy soup (Wortsman et al. 2022, Algorithm 1): rank models by `evaluate` (higher is better),
    start from the best, add each next one only if the uniform average with it scores strictly higher.

    Returns the soup and the indices (into `sources`) of the models in it, in the order added.
    """
    states = _prepare(sources)
    scores = [float(evaluate(s)) for s in states]
    order = sorted(range(len(states)), key=lambda i: -scores[i])  # stable: ties keep input order
    kept, soup, best = [order[0]], states[order[0]], scores[order[0]]
    for i in order[1:]:
        candidate = weighted_average([states[j] for j in kept + [i]])
        score = float(evaluate(candidate))
        if score > best:
            kept, soup, best = kept + [i], candidate, score
    return soup, kept


def task_arithmetic(base: Source, finetuned: Sequence[Source], lambdas: Sequence[float] | None = None
                    ) -> dict[str, torch.Tensor]:
    """base + sum_i lambda_i (theta_i - base); a negative lambda subtracts (forgets) a task."""
    states = _prepare([base, *finetuned], ["base"] + [f"fine-tuned model {i}" for i in range(len(finetuned))])
    if not finetuned:
        raise ValueError("task arithmetic needs at least one fine-tuned model besides the base")
    lam = [1.0] * len(finetuned) if lambdas is None else [float(x) for x in lambdas]
    if len(lam) != len(finetuned):
        raise ValueError(f"{len(lam)} lambdas for {len(finetuned)} fine-tuned models; give one per model")
    return _combine(states, lambda ts: ts[0] + sum(li * (t - ts[0]) for li, t in zip(lam, ts[1:])))


def trim(task_vector: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the round(density * n) largest-magnitude entries (ties: the earlier index), zero the rest."""
    n = task_vector.numel()
    drop = n - min(n, round(density * n))
    mask = smallest_masks([task_vector.abs()], drop)[0]
    return task_vector.masked_fill(mask, 0.0)


def ties_merge_tensors(base: torch.Tensor, finetuned: list[torch.Tensor], density: float, scale: float
                       ) -> torch.Tensor:
    """TIES on one tensor: trim, elect sign, disjoint mean, base + scale * merged."""
    taus = torch.stack([trim(t - base, density) for t in finetuned])  # (n_models, ...)
    sign = torch.sign(taus.sum(dim=0))  # elected sign; 0 where the trimmed values cancel exactly
    agree = (torch.sign(taus) == sign) & (taus != 0)
    count = agree.sum(dim=0)
    merged = torch.where(agree, taus, torch.zeros_like(taus)).sum(dim=0) / count.clamp(min=1)
    return base + scale * merged


def ties(base: Source, finetuned: Sequence[Source], density: float = 0.2, scale: float = 1.0
         ) -> dict[str, torch.Tensor]:
    """TIES-Merging, tensor by tensor (each tensor's task vector trimmed to its own top-k%, as
    mergekit does; the paper's code trims over the whole flattened model)."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"ties density={density} must be in (0, 1]")
    states = _prepare([base, *finetuned], ["base"] + [f"fine-tuned model {i}" for i in range(len(finetuned))])
    if not finetuned:
        raise ValueError("TIES needs at least one fine-tuned model besides the base")
    return _combine(states, lambda ts: ties_merge_tensors(ts[0], ts[1:], density, scale))


def merge(sources: Sequence[Source], config: MergeConfig, base: Source | None = None) -> dict[str, torch.Tensor]:
    """Merge by `config.method`; task_arithmetic and ties need `base` (sources are then the fine-tuned models).

    The result is a state_dict: load it into a copy of one of the models (`load_state_dict`).
    """
    if config.method == "average":
        return weighted_average(sources, config.weights)
    if base is None:
        raise ValueError(f"merge method {config.method!r} needs the base model the others were fine-tuned from")
    if config.method == "task_arithmetic":
        return task_arithmetic(base, sources, config.lambdas)
    return ties(base, sources, config.density, config.scale)
