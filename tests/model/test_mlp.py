"""The SwiGLU used in training equals silu(gate) * up and its autograd gradients, and saves less."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmforge.model.mlp import _SwiGLU, swiglu


def test_swiglu_gradients_equal_autograd_of_the_formula() -> None:
    g = torch.randn(6, 10, dtype=torch.float64, requires_grad=True)
    u = torch.randn(6, 10, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_SwiGLU.apply, (g, u))
    out = swiglu(g, u)
    grad = torch.randn_like(out)
    ours = torch.autograd.grad(out, (g, u), grad)
    reference = torch.autograd.grad(F.silu(g) * u, (g, u), grad)
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b)


def test_swiglu_bf16_backward_matches_fp32_reference() -> None:
    g = torch.randn(64, 32, dtype=torch.bfloat16, requires_grad=True)
    u = torch.randn(64, 32, dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(64, 32, dtype=torch.bfloat16)
    ours = torch.autograd.grad(swiglu(g, u), (g, u), grad)
    g32, u32 = g.detach().float().requires_grad_(), u.detach().float().requires_grad_()
    reference = torch.autograd.grad(F.silu(g32) * u32, (g32, u32), grad.float())
    for a, b in zip(ours, reference):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b, atol=2e-2, rtol=2e-2)  # one bf16 rounding


def test_swiglu_saves_two_activations_where_autograd_saves_three() -> None:
    def saved_bytes(fn) -> int:
        seen: dict[int, int] = {}

        def pack(t):
            seen[t.data_ptr()] = t.numel() * t.element_size()
            return t

        g, u = torch.randn(128, 256, requires_grad=True), torch.randn(128, 256, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(g, u)
        return sum(seen.values())

    one = 128 * 256 * 4
    assert saved_bytes(swiglu) == 2 * one
    assert saved_bytes(lambda g, u: F.silu(g) * u) == 3 * one


def test_swiglu_without_grad_is_the_plain_formula() -> None:
    g, u = torch.randn(4, 8), torch.randn(4, 8)
    with torch.no_grad():
        torch.testing.assert_close(swiglu(g, u), F.silu(g) * u)
