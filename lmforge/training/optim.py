"""Optimizers: torch AdamW, and AdamW with 8-bit blockwise-quantized states; flat tensor state.

8-bit states follow Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization"
(https://arxiv.org/abs/2110.02861): each state tensor is cut into blocks of 256 with one fp32
absmax per block. Instead of their dynamic-tree code we use square-root companding (code =
round(127 * sqrt(|x| / absmax))), which likewise resolves small values finely: 2 bytes of
state per parameter instead of 8.
"""

from __future__ import annotations

from typing import Iterable

import torch

BLOCK = 256


def quantize_state(x: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes int8/uint8 (n_blocks, 256), absmax fp32 (n_blocks,)) with sqrt companding."""
    flat = x.reshape(-1)
    pad = (-flat.numel()) % BLOCK
    blocks = torch.cat([flat, flat.new_zeros(pad)]).view(-1, BLOCK)
    absmax = blocks.abs().amax(dim=1).clamp(min=1e-30)
    levels = 127.0 if signed else 255.0
    mag = torch.round(levels * (blocks.abs() / absmax[:, None]).sqrt())
    if signed:
        return (mag * blocks.sign()).to(torch.int8), absmax
    return mag.to(torch.uint8), absmax


def dequantize_state(codes: torch.Tensor, absmax: torch.Tensor, like: torch.Tensor, signed: bool) -> torch.Tensor:
    levels = 127.0 if signed else 255.0
    c = codes.float() / levels
    x = c.abs().square() * c.sign() * absmax[:, None]
    return x.reshape(-1)[:like.numel()].view_as(like)


class AdamW8bit(torch.optim.Optimizer):
    """AdamW (decoupled weight decay) whose moments are stored in 8 bits between steps."""

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    zeros = torch.zeros_like(p, dtype=torch.float32)
                    state["step"] = torch.zeros(())
                    state["m_codes"], state["m_absmax"] = quantize_state(zeros, True)
                    state["v_codes"], state["v_absmax"] = quantize_state(zeros, False)
                m = dequantize_state(state["m_codes"], state["m_absmax"], p, True)
                v = dequantize_state(state["v_codes"], state["v_absmax"], p, False)
                state["step"] += 1
                t = float(state["step"])
                g = p.grad.float()
                m.mul_(b1).add_(g, alpha=1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                p.mul_(1 - group["lr"] * group["weight_decay"])
                denom = (v / (1 - b2 ** t)).sqrt_().add_(group["eps"])
                p.addcdiv_(m, denom, value=-group["lr"] / (1 - b1 ** t))
                state["m_codes"], state["m_absmax"] = quantize_state(m, True)
                state["v_codes"], state["v_absmax"] = quantize_state(v, False)


def build_optimizer(named: dict[str, torch.nn.Parameter], name: str, lr: float, weight_decay: float,
                    betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.Optimizer:
    """AdamW ('adamw') or 8-bit AdamW ('adamw8bit') over the trainable parameters."""
    params = list(named.values())
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas, foreach=False)
    if name == "adamw8bit":
        return AdamW8bit(params, lr=lr, weight_decay=weight_decay, betas=betas)
    raise ValueError(f"optimizer={name!r} must be 'adamw' or 'adamw8bit'")


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes held by the optimizer state."""
    return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
               if isinstance(t, torch.Tensor))


def optimizer_tensors(opt: torch.optim.Optimizer, names: list[str]) -> dict[str, torch.Tensor]:
    """The optimizer state flattened to named tensors (for safetensors; no pickle)."""
    params = [p for g in opt.param_groups for p in g["params"]]
    out = {}
    for name, p in zip(names, params):
        for key, value in opt.state.get(p, {}).items():
            out[f"{name}::{key}"] = value if isinstance(value, torch.Tensor) else torch.tensor(value)
    return out


def load_optimizer_tensors(opt: torch.optim.Optimizer, names: list[str], tensors: dict[str, torch.Tensor]) -> None:
    """Inverse of `optimizer_tensors`."""
    params = [p for g in opt.param_groups for p in g["params"]]
    by_param: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name, _, field = key.partition("::")
        by_param.setdefault(name, {})[field] = value
    unknown = set(by_param) - set(names)
    if unknown:
        raise ValueError(f"optimizer state has parameters the model lacks: {sorted(unknown)[:3]}")
    for name, p in zip(names, params):
        if name in by_param:
            # moments go back to the parameter's device; torch keeps `step` on the CPU
            opt.state[p] = {k: v.clone() if k == "step" else v.to(p.device, copy=True)
                            for k, v in by_param[name].items()}

