"""Mixture of Experts: a router sends each token to its top-k SwiGLU experts; compute is grouped by expert.

Sparsely-gated MoE (Shazeer et al. 2017, https://arxiv.org/abs/1701.06538) as Mixtral runs it
(Jiang et al. 2024, https://arxiv.org/abs/2401.04088): softmax over the experts, top-k, the k
weights renormalised to sum to 1. Qwen1.5-MoE keeps the top-k probabilities as they are and adds a
shared expert behind a sigmoid gate. Training adds the Switch Transformer load-balancing loss
(Fedus et al. 2021, https://arxiv.org/abs/2101.03961, eq. 4-6) and the ST-MoE router z-loss
(Zoph et al. 2022, https://arxiv.org/abs/2202.08906, eq. 5); an optional capacity factor drops
the assignments past an expert's capacity (Switch, sec. 2.2). Expert weights are stacked under
transformers 5's names (`experts.gate_up_proj` (E, 2I, H), `experts.down_proj` (E, H, I)).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.config import Config
from lmforge.model.linear import Linear
from lmforge.model.mlp import GatedMLP

# True while gradient checkpointing recomputes a forward in backward: the layer then records
# nothing, so its router logits and expert counts are those of the real forward, counted once.
_RECOMPUTING: ContextVar[bool] = ContextVar("lmforge_moe_recomputing", default=False)


@contextmanager
def recomputation() -> Iterator[None]:
    """Mark a checkpoint recompute (pass as the second context of checkpoint's `context_fn`)."""
    token = _RECOMPUTING.set(True)
    try:
        yield
    finally:
        _RECOMPUTING.reset(token)


def route(logits: torch.Tensor, k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of softmax(logits): weights (N, k) in fp32 and expert ids (N, k).

    With `normalize` the k weights are rescaled to sum to 1 (Mixtral); without, they are the
    router probabilities themselves (Qwen1.5-MoE).
    """
    probs = torch.softmax(logits.float(), dim=-1)  # (N, E)
    weights, experts = probs.topk(k, dim=-1)  # (N, k) each
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, experts


def expert_capacity(n_tokens: int, k: int, n_experts: int, factor: float) -> int:
    """Assignments one expert takes: factor * tokens * k / experts, rounded up (Switch, eq. 3)."""
    return max(1, math.ceil(factor * n_tokens * k / n_experts))


@dataclass
class Dispatch:
    """Where the (N, k) assignments go, grouped by expert: row `i` of the grouped batch is token
    `token[i]`'s `choice[i]`-th pick; expert e takes `counts[e]` rows, after expert e - 1's."""

    token: torch.Tensor  # (M,) token index of each kept assignment, expert by expert
    choice: torch.Tensor  # (M,) its rank among the token's picks (0 = the router's first choice)
    counts: list[int]  # (E,) assignments each expert computes
    routed: torch.Tensor  # (E,) assignments the router made to each expert, kept or dropped


def dispatch(experts: torch.Tensor, n_experts: int, capacity: int | None = None) -> Dispatch:
    """Sort the assignments (N, k) by expert; past `capacity` an expert drops the rest.

    The sort is stable over choice-major order (every token's first pick, then every second
    pick), so under a capacity first picks win over second picks and earlier tokens over later
    ones, the priority of GShard and Switch.
    """
    N = experts.shape[0]
    flat = experts.t().reshape(-1)  # (k*N,) choice-major
    order = torch.argsort(flat, stable=True)  # grouped by expert, priority kept inside a group
    routed = torch.bincount(flat, minlength=n_experts)  # (E,)
    counts = routed
    if capacity is not None:
        starts = routed.cumsum(0) - routed
        place = torch.arange(order.numel(), device=order.device) - starts.repeat_interleave(routed)
        order = order[place < capacity]  # place in its expert's queue
        counts = routed.clamp(max=capacity)
    return Dispatch(order % N, torch.div(order, N, rounding_mode="floor"), counts.tolist(), routed)


class Experts(nn.Module):
    """E SwiGLU experts, down(silu(gate(x)) * up(x)), stacked: gate_up_proj (E, 2I, H), down_proj (E, H, I)."""

    def __init__(self, n_experts: int, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * hidden, dim))
        self.down_proj = nn.Parameter(torch.empty(n_experts, dim, hidden))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, plan: Dispatch) -> torch.Tensor:
        """sum_j weights[n, j] * expert_{j}(x[n]) for every token: one gather, one matmul chain per
        expert that received rows, one index_add back (no loop over tokens).

        Args:
            x: (N, H) tokens; weights: (N, k) routing weights; plan: `dispatch` of the (N, k) picks.
        """
        rows = x.index_select(0, plan.token)  # (M, H) grouped by expert
        # unbind once: indexing the stacked weights per expert would give each expert's gradient
        # as a full (E, ...) tensor of zeros in backward, E times over
        gate_up, down = self.gate_up_proj.unbind(0), self.down_proj.unbind(0)
        outs = [expert_swiglu(part, gate_up[e], down[e]) for e, part in enumerate(rows.split(plan.counts))
                if plan.counts[e]]
        if not outs:
            return torch.zeros_like(x)
        w = weights.t().reshape(-1).index_select(0, plan.choice * x.shape[0] + plan.token)  # (M,)
        y = torch.cat(outs) * w[:, None].to(x.dtype)  # (M, H)
        return torch.zeros_like(x).index_add(0, plan.token, y)


def expert_swiglu(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """down(silu(gate x) * up x) with gate and up stacked in gate_up (2I, H); x (n, H) -> (n, H)."""
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)  # (n, I) each
    return F.linear(F.silu(gate) * up, down)


class MoE(nn.Module):
    """The sparse feed-forward block: router `gate`, `experts`, optional gated `shared_expert`.

    Each forward keeps its router logits (`router_logits`, for the auxiliary losses) and adds the
    assignments per expert to `tokens_per_expert` (usage statistics; `reset_usage` clears them).
    """

    def __init__(self, config: Config, layer_idx: int = 0) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_experts, self.top_k = config.n_experts, config.n_experts_per_tok
        self.normalize, self.capacity_factor = config.norm_topk_prob, config.capacity_factor
        self.gate = Linear(config.n_embd, config.n_experts, bias=False)
        self.experts = Experts(config.n_experts, config.n_embd, config.moe_intermediate_size)
        self.shared_expert = self.shared_expert_gate = None
        if config.shared_expert_intermediate_size:
            self.shared_expert = GatedMLP(config, config.shared_expert_intermediate_size)
            self.shared_expert_gate = Linear(config.n_embd, 1, bias=False)
        self.router_logits: torch.Tensor | None = None  # (N, E) of the last forward
        self.tokens_per_expert: torch.Tensor | None = None  # (E,) routed assignments since reset
        self.dropped = 0  # assignments dropped by the capacity since reset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, H)
        logits = self.gate(x)  # (N, E)
        weights, experts = route(logits, self.top_k, self.normalize)
        capacity = None if self.capacity_factor is None else \
            expert_capacity(x.shape[0], self.top_k, self.n_experts, self.capacity_factor)
        plan = dispatch(experts, self.n_experts, capacity)
        out = self.experts(x, weights, plan)
        if self.shared_expert is not None:  # Qwen-MoE: every token also goes through the shared expert
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        if not _RECOMPUTING.get():
            self._record(logits, plan)
        return out.view(shape)

    def _record(self, logits: torch.Tensor, plan: Dispatch) -> None:
        self.router_logits = logits
        routed, before = plan.routed.detach(), self.tokens_per_expert
        # out of place: generation runs in inference mode, whose tensors cannot be updated outside it
        self.tokens_per_expert = routed if before is None else before.to(routed.device) + routed
        if self.capacity_factor is not None:
            self.dropped += int(routed.sum()) - sum(plan.counts)

    def reset_usage(self) -> None:
        self.tokens_per_expert, self.dropped = None, 0


# --- the auxiliary losses, over the router logits of every MoE layer -------------------------

def _stack(router_logits: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """All layers' logits as one (L*N, E) fp32 batch, layer after layer."""
    if isinstance(router_logits, torch.Tensor):
        return router_logits.float()
    return torch.cat([t.float() for t in router_logits])


def _mean(values: torch.Tensor, valid: torch.Tensor | None, layers: int) -> torch.Tensor:
    """Mean over rows (dim 0) of the (L*N, ...) values, counting only rows whose token is valid (N,)."""
    if valid is None:
        return values.mean(0)
    w = valid.reshape(-1).to(values.dtype).repeat(layers)  # (L*N,)
    w = w.view(-1, *([1] * (values.dim() - 1)))
    return (values * w).sum(0) / w.sum().clamp(min=1)


def load_balancing_loss(router_logits: torch.Tensor | Sequence[torch.Tensor], n_experts: int, top_k: int,
                        valid: torch.Tensor | None = None) -> torch.Tensor:
    """Switch Transformer's auxiliary loss E * sum_e f_e * P_e over all layers' tokens together.

    f_e: top-k picks that go to expert e per token; P_e: mean router probability of e. It is
    top_k when routing is even and approaches E when one expert takes every token; the same
    formula as transformers' `load_balancing_loss_func` (Mixtral, Qwen2-MoE).

    Args:
        router_logits: (N, E) per MoE layer, or one (L*N, E) tensor.
        valid: (N,) or (B, T) bool, False at padding; None counts every token.
    """
    logits = _stack(router_logits)
    layers = logits.shape[0] // (valid.numel() if valid is not None else logits.shape[0])
    probs = torch.softmax(logits, dim=-1)  # (L*N, E)
    picks = F.one_hot(probs.topk(top_k, dim=-1).indices, n_experts).sum(1).to(probs.dtype)  # (L*N, E)
    return n_experts * (_mean(picks, valid, layers) * _mean(probs, valid, layers)).sum()


def router_z_loss(router_logits: torch.Tensor | Sequence[torch.Tensor],
                  valid: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE's z-loss, mean of logsumexp(logits)^2: keeps router logits small, so the softmax
    stays exact in low precision (Zoph et al. 2022, eq. 5)."""
    logits = _stack(router_logits)
    layers = logits.shape[0] // (valid.numel() if valid is not None else logits.shape[0])
    return _mean(torch.logsumexp(logits, dim=-1) ** 2, valid, layers)


# --- the model's MoE layers -------------------------------------------------------------------

def moe_layers(model: nn.Module) -> list[MoE]:
    """The MoE blocks of a model, in layer order."""
    return [m for m in model.modules() if isinstance(m, MoE)]


def take_router_logits(model: nn.Module) -> list[torch.Tensor]:
    """Each MoE layer's router logits (N, E) from the last forward, cleared from the layers."""
    out = []
    for layer in moe_layers(model):
        if layer.router_logits is not None:
            out.append(layer.router_logits)
            layer.router_logits = None
    return out


def expert_usage(model: nn.Module) -> dict[str, list[float]]:
    """Per MoE layer (key: its index) the fraction of routed assignments each expert got since the
    last `reset_usage`; {} for a dense model or before any forward."""
    usage = {}
    for layer in moe_layers(model):
        counts = layer.tokens_per_expert
        if counts is not None and int(counts.sum()):
            usage[str(layer.layer_idx)] = (counts.double() / counts.sum()).tolist()
    return usage


def reset_usage(model: nn.Module) -> None:
    """Start counting expert usage afresh in every MoE layer."""
    for layer in moe_layers(model):
        layer.reset_usage()


def dropped_fraction(model: nn.Module) -> float:
    """Share of routed assignments the capacity dropped since the last reset (all layers)."""
    layers = [m for m in moe_layers(model) if m.tokens_per_expert is not None]
    routed = sum(int(m.tokens_per_expert.sum()) for m in layers)
    return sum(m.dropped for m in layers) / routed if routed else 0.0
