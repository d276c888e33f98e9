"""The fused C++ decode step over GGUF blocks (decode.cpp's Matrix.gguf) against the PyTorch modules."""

from __future__ import annotations

import copy

import pytest
import torch
from gguf import GGMLQuantizationType as Q

from lmforge.checkpoint.gguf_blocks import BlockTensor, GGUFLinear, dequantize_model, random_blocks
from lmforge.config import Config
from lmforge.generation import fused_decode
from lmforge.generation.fused_decode import decode_step
from lmforge.generation.kv_cache import KVCache
from lmforge.kernels import gemv
from lmforge.model.transformer import build_model

pytestmark = pytest.mark.skipif(gemv.extension() is None, reason="lmforge's CPU kernels could not be built here")
TYPES = {"q_proj": Q.Q4_K, "k_proj": Q.Q5_0, "v_proj": Q.Q8_0, "o_proj": Q.Q4_1, "gate_proj": Q.Q4_0,
         "up_proj": Q.Q6_K, "down_proj": Q.Q4_K}


def gguf_model(name: str = "tiny-llama"):
    """A tiny model (widths of whole 256-weight blocks) whose linears are GGUFLinear of mixed types, the
    lm_head Q8_0; small random scales keep activations in range."""
    torch.manual_seed(0)
    model = build_model(Config.from_name(name, n_embd=256, intermediate_size=512, n_head=4, n_kv_head=2,
                                         head_dim=64, tie_embeddings=False)).eval()
    g = torch.Generator().manual_seed(0)
    for module_name, module in list(model.named_modules()):
        leaf = module_name.rpartition(".")[2]
        if leaf in TYPES or module_name == "lm_head":
            qtype = TYPES.get(leaf, Q.Q8_0)
            n, k = module.weight.shape
            scale = 0.002 if qtype in (Q.Q4_K, Q.Q6_K) else 0.02  # K types multiply it by 6- and 8-bit sub-scales
            blocks = random_blocks(qtype, n, k, g, scale)
            parent, _, attr = module_name.rpartition(".")
            setattr(model.get_submodule(parent), attr, GGUFLinear.from_blocks(BlockTensor(blocks, qtype, (n, k))))
    return model


def decode_logits(model, prompt: torch.Tensor, steps: int, fused: bool) -> torch.Tensor:
    """Logits (B, steps, V) of greedy steps after a prefill: the fused step (which must run) or the modules."""
    cache = KVCache(model.config, prompt.shape[0], prompt.shape[1] + steps)
    with torch.inference_mode():
        logits = model(prompt, cache=cache, last_only=True)[:, -1]
        out = []
        for _ in range(steps):
            token = logits.argmax(-1)
            logits = decode_step(model, token, cache) if fused else model(token[:, None], cache=cache)[:, -1]
            assert logits is not None, "the fused step did not run"
            out.append(logits)
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma3"])
@pytest.mark.parametrize("batch", [1, 3, 8])
def test_fused_step_over_gguf_blocks_equals_the_modules(name, batch):
    """Every block type in one model; 1 and 3 rows decode slices in registers, 8 rows take transposed lanes."""
    model = gguf_model(name)
    prompt = torch.randint(0, model.config.vocab_size, (batch, 5))
    fused = decode_logits(model, prompt, 6, fused=True)
    plan = fused_decode.plan_for(model)
    assert plan is not None and plan.has_head and not plan.has_int4
    expected = decode_logits(model, prompt, 6, fused=False)
    torch.testing.assert_close(fused, expected, rtol=0, atol=1e-4 * float(expected.abs().max()))


def _paged_step(model, rows: int):
    """decode_layers_paged on `rows` rows that each attend to one key of a 16-slot cache."""
    c = model.config
    caches = [torch.zeros(16, c.n_kv_head, c.head_dim) for _ in range(2 * c.n_layer)]
    slots = torch.zeros(rows, dtype=torch.long)
    torch.manual_seed(1)
    return gemv.extension().decode_layers_paged(
        fused_decode.plan_for(model), torch.randn(rows, c.n_embd), caches[:c.n_layer], caches[c.n_layer:], slots,
        [slots[:, None]], [torch.ones(rows, dtype=torch.long)], [torch.ones(rows, c.head_dim)],
        [torch.zeros(rows, c.head_dim)], logits=True)


def test_paged_step_runs_64_gguf_rows_like_their_fp32_weights():
    """GGUF products take the paged step's 64 rows (int4 ones stop at 8): equal to the same weights in fp32."""
    model = gguf_model()
    plain = dequantize_model(copy.deepcopy(model))
    got, expected = _paged_step(model, 64), _paged_step(plain, 64)
    assert got.shape == (64, model.config.vocab_size)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4 * float(expected.abs().max()))
