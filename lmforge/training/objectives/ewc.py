"""Elastic weight consolidation (Kirkpatrick et al. 2017, https://arxiv.org/abs/1612.00796): while
learning task B, pull each trained parameter back towards its task-A value theta*, in proportion to how
much task A's log-likelihood depends on it (the diagonal of the Fisher information F):

    loss_B(theta) + (lambda / 2) * sum_i F_i (theta_i - theta*_i)^2          (the paper's eq. 3)

F is the empirical Fisher, estimated per batch: F_i = 1/N sum_b (d L_b / d theta_i)^2 with L_b the
mean token negative log-likelihood of the observed labels of batch b (not labels sampled from the
model, and batch gradients rather than per-example ones: one backward per batch, N batches).
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lmforge.atomic import atomic_write
from lmforge.training.objectives.cross_entropy import count_loss_tokens


def trained(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters being trained (with LoRA: the adapter tensors), by name."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def estimate_fisher(model: nn.Module, objective, batches, n_batches: int | None = None) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher: mean over batches of the squared gradient of each batch's mean NLL.

    Args:
        objective: `objective(model, batch) -> mean token loss` (sft_loss), the negative log-likelihood.
        batches: an iterable of micro-batches (a list, or Batches.all()); the first n_batches are used.
    """
    params = trained(model)
    if not params:
        raise ValueError("EWC: the model has no trainable parameters; apply the adapter before the Fisher")
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    device = next(iter(params.values())).device
    was_training = model.training
    model.eval()  # no dropout: the Fisher of the deterministic model
    count = 0
    for batch in list(batches)[:n_batches]:
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        loss = objective(model, {**batch, "loss_tokens": max(1, count_loss_tokens(batch))})
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for (name, _), g in zip(params.items(), grads):
            if g is not None:
                fisher[name] += g.detach().float() ** 2
        count += 1
    model.train(was_training)
    if count == 0:
        raise ValueError("EWC: no batches to estimate the Fisher from; is the previous task's data empty?")
    return {n: f / count for n, f in fisher.items()}


def anchor(model: nn.Module) -> dict[str, torch.Tensor]:
    """theta*: a detached copy of the trained parameters (the previous task's solution)."""
    return {n: p.detach().float().clone() for n, p in trained(model).items()}


def save_ewc(path: str | Path, fisher: dict[str, torch.Tensor], theta_star: dict[str, torch.Tensor]) -> Path:
    """Fisher and anchor in one safetensors file (keys fisher::NAME, anchor::NAME), written atomically."""
    tensors = {f"fisher::{n}": f.contiguous() for n, f in fisher.items()}
    tensors.update({f"anchor::{n}": a.contiguous() for n, a in theta_star.items()})
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp)))
    return Path(path)


def load_ewc(path: str | Path, model: nn.Module | None = None) -> tuple[dict, dict]:
    """(fisher, anchor) from save_ewc's file; with a model, every trained parameter must be in it."""
    raw = load_file(str(path))
    fisher = {k.split("::", 1)[1]: v for k, v in raw.items() if k.startswith("fisher::")}
    theta_star = {k.split("::", 1)[1]: v for k, v in raw.items() if k.startswith("anchor::")}
    if model is not None:
        params = trained(model)
        missing = sorted(set(params) - set(fisher))
        if missing or set(fisher) != set(theta_star):
            raise ValueError(f"{path}: EWC file lacks {missing[:3]} of the trained parameters; it was estimated "
                             "for another model/adapter (continue task B from task A's adapter)")
        for n, p in params.items():
            if fisher[n].shape != p.shape:
                raise ValueError(f"{path}: {n} has shape {tuple(fisher[n].shape)}, the model's {tuple(p.shape)}")
    return fisher, theta_star


def ewc_penalty(params: dict[str, torch.Tensor], fisher: dict[str, torch.Tensor], theta_star: dict[str, torch.Tensor],
                lam: float) -> torch.Tensor:
    """(lambda / 2) * sum_i F_i (theta_i - theta*_i)^2 over the named parameters."""
    total = None
    for name, p in params.items():
        f, a = fisher[name].to(p.device), theta_star[name].to(p.device)
        term = (f * (p.float() - a) ** 2).sum()
        total = term if total is None else total + term
    if total is None:
        raise ValueError("EWC: no parameters to penalise")
    return 0.5 * lam * total


def ewc_loss(model: nn.Module, batch: dict, objective, fisher: dict, theta_star: dict, lam: float) -> torch.Tensor:
    """objective + the EWC penalty, split over a step's micro-batches by their share of its label tokens
    (so the penalty counts once per optimizer step); evaluation (eval mode) gets the plain objective."""
    loss = objective(model, batch)
    if not model.training or lam == 0:
        return loss
    share = count_loss_tokens(batch) / batch.get("loss_tokens", max(1, count_loss_tokens(batch)))
    params = {n: p for n, p in model.named_parameters() if n in fisher}
    return loss + share * ewc_penalty(params, fisher, theta_star, lam)


def with_ewc(objective, fisher: dict, theta_star: dict, lam: float):
    """Wrap any `objective(model, batch)` with the EWC penalty."""
    if lam < 0:
        raise ValueError(f"continual.ewc_lambda={lam} must be >= 0")
    return functools.partial(ewc_loss, objective=objective, fisher=fisher, theta_star=theta_star, lam=lam)
