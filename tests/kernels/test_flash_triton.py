"""The Triton flash-attention kernels against torch's attention: in Triton's interpreter on the CPU,
compiled on a GPU when there is one. Skipped where Triton is not installed.

Triton decides at `import triton` whether its own library functions are interpreted, and other
tests import it first (transformers and torch._dynamo do), so on the CPU the kernels run in one
subprocess started with TRITON_INTERPRET=1 (this file is its script); the references are
computed here.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

if __name__ != "__main__" and importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
SMALL = dict(fwd_blocks=(16, 16), bwd_blocks=(16, 16))  # the interpreter is slow: small blocks, small sizes
ROOT = Path(__file__).resolve().parents[2]

SHAPES = {  # (B, H, H_kv, T, S, head_dim); no length is a multiple of the 16-wide blocks
    "mha": (1, 2, 2, 37, 37, 16),
    "gqa": (2, 4, 2, 29, 29, 32),
    "mqa": (1, 3, 1, 21, 21, 16),
    "prefill T<S": (1, 2, 1, 19, 45, 16),
    "head_dim 24": (1, 2, 2, 23, 23, 24),
    "ragged": (2, 4, 2, 20, 40, 16),
}
CASES = [(shape, causal) for shape in SHAPES for causal in (True, False)] + [("no keys", True)]


def make_case(shape: str, causal: bool) -> dict:
    """Seeded inputs of one case: q, k, v, the output gradient, mask and scale."""
    torch.manual_seed(CASES.index((shape, causal)))
    B, H, H_kv, T, S, D = SHAPES.get(shape, (1, 2, 1, 16, 16, 16))
    case = {"q": torch.randn(B, H, T, D), "k": torch.randn(B, H_kv, S, D), "v": torch.randn(B, H_kv, S, D),
            "grad": torch.randn(B, H, T, D), "causal": causal, "scale": 0.3, "key_valid": None}
    if shape == "ragged":
        case["key_valid"] = torch.arange(S) < torch.tensor([S, 23])[:, None]
    if shape == "no keys":  # causal: queries 0-4 see no key
        case["key_valid"] = torch.arange(S)[None, :] >= 5
    return case


def run_kernels(case: dict, kernels) -> dict:
    """Output and q/k/v gradients of the Triton op on one case (on DEVICE)."""
    q, k, v = (case[n].to(DEVICE).requires_grad_() for n in "qkv")
    valid = None if case["key_valid"] is None else case["key_valid"].to(DEVICE)
    out = kernels.flash_attention_triton(q, k, v, causal=case["causal"], scale=case["scale"], key_valid=valid,
                                         **SMALL)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), case["grad"].to(DEVICE))
    return {n: t.detach().cpu() for n, t in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv))}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    """Every case through the kernels: in-process on a GPU, else in one interpreter subprocess."""
    cases = {f"{shape}|{causal}": make_case(shape, causal) for shape, causal in CASES}
    if ON_GPU:
        from lmforge.kernels import flash_triton

        return {name: run_kernels(case, flash_triton) for name, case in cases.items()}
    folder = tmp_path_factory.mktemp("flash_triton")
    torch.save(cases, folder / "cases.pt")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, __file__, str(folder)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(folder / "results.pt")


def reference(case: dict) -> dict:
    """torch SDPA in float64 over an explicit bool mask (bottom-right causal), and its gradients."""
    q, k, v = (case[n].double().requires_grad_() for n in "qkv")
    T, S = q.shape[2], k.shape[2]
    mask = torch.ones(q.shape[0], 1, T, S, dtype=torch.bool)
    if case["causal"]:
        mask &= torch.ones(T, S, dtype=torch.bool).tril(S - T)
    if case["key_valid"] is not None:
        mask &= case["key_valid"][:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=case["scale"],
                                         enable_gqa=k.shape[1] != q.shape[1])
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), case["grad"].double())
    return {"out": out, "dq": dq, "dk": dk, "dv": dv}


@pytest.mark.parametrize("shape,causal", [c for c in CASES if c[0] != "no keys"])
def test_forward_and_grads_equal_sdpa(results, shape, causal):
    got, want = results[f"{shape}|{causal}"], reference(make_case(shape, causal))
    for name in ("out", "dq", "dk", "dv"):
        tol = 2e-6 if name == "out" else 1e-5
        torch.testing.assert_close(got[name].double(), want[name], atol=tol, rtol=1e-5,
                                   msg=lambda m: f"{name}: {m}")


def test_rows_without_keys_are_zero_with_finite_grads(results):
    case = make_case("no keys", True)
    got = results["no keys|True"]
    assert torch.equal(got["out"][:, :, :5], torch.zeros_like(got["out"][:, :, :5]))
    assert all(torch.isfinite(got[n]).all() for n in ("dq", "dk", "dv"))
    want = reference({**case, **{n: case[n][:, :, 5:] for n in ("q", "grad")}})  # rows 5+ (T < S: offset 5)
    torch.testing.assert_close(got["out"][:, :, 5:].double(), want["out"], atol=2e-6, rtol=1e-5)


def test_equals_the_cpu_flash_algorithm(results):
    """The two implementations of one algorithm agree (model/flash.py is tested on its own)."""
    from lmforge.model.flash import flash_attention

    case = make_case("gqa", True)
    out = flash_attention(case["q"], case["k"], case["v"], causal=True, scale=case["scale"], block_q=8, block_k=8)
    torch.testing.assert_close(results["gqa|True"]["out"], out, atol=2e-6, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")
@pytest.mark.parametrize("causal", [True, False])
def test_bf16_default_blocks_track_sdpa_on_gpu(causal):
    from lmforge.kernels.flash_triton import flash_attention_triton

    q, k, v = (torch.randn(2, h, 1000, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for h in (8, 2, 2))
    out = flash_attention_triton(q, k, v, causal=causal)
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=causal, enable_gqa=True)
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)
    grad = torch.randn_like(out)
    for g, w in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad.double())):
        assert (g.double() - w).abs().max() <= 3e-2 * w.abs().max()


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")
def test_model_flash_runs_the_triton_kernel_on_gpu(monkeypatch):
    from lmforge.kernels import flash_triton
    from lmforge.model import flash

    calls = []
    real = flash_triton.flash_attention_triton
    monkeypatch.setattr(flash_triton, "flash_attention_triton", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    q, k, v = (torch.randn(1, h, 64, 64, device="cuda") for h in (4, 2, 2))
    out = flash.attend(q, k, v, None, True, 0.125)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.125, enable_gqa=True)
    assert calls and out.is_cuda
    torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-4)


if __name__ == "__main__":  # the interpreter subprocess: TRITON_INTERPRET=1 was set before triton loads
    from lmforge.kernels import flash_triton

    folder = Path(sys.argv[1])
    todo = torch.load(folder / "cases.pt")
    torch.save({name: run_kernels(case, flash_triton) for name, case in todo.items()}, folder / "results.pt")
