"""The fused C++ decode step against the PyTorch modules it replaces."""

from __future__ import annotations

import pytest
import torch

from lmforge.config import Config
from lmforge.generation import fused_decode
from lmforge.generation import steps
from lmforge.generation.fused_decode import decode_step
from lmforge.generation.generate import decode_one_token, generate_ids
from lmforge.generation.kv_cache import KVCache
from lmforge.generation.sampling import SamplingParams
from lmforge.kernels import gemv
from lmforge.model.transformer import build_model
from lmforge.quantization.quantize import QuantConfig, quantize_model
from lmforge.training.lora import LoRAConfig, apply_lora

pytestmark = pytest.mark.skipif(gemv.extension() is None, reason="lmforge's CPU kernels could not be built here")


def decode_logits(model, prompt: torch.Tensor, steps: int, fused: bool) -> torch.Tensor:
    """Logits (B, steps, V) of greedy decode steps after a prefill: the fused step (which must run), or
    model.forward (the PyTorch modules)."""
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


def tiny(name: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return build_model(Config.from_name(name, **overrides)).eval()


def assert_fused_equals_modules(model, prompt: torch.Tensor, steps: int) -> None:
    """`steps` fused decode steps give the modules' fp32 logits (the fused step must have run)."""
    fused = decode_logits(model, prompt, steps, fused=True)
    assert fused_decode.plan_for(model) is not None
    torch.testing.assert_close(fused, decode_logits(model, prompt, steps, fused=False), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma3"])
def test_fused_step_equals_the_modules(name):
    """Gemma 3's QK-norm, sandwich norms, GeGLU and a sliding window (8) the decode runs past."""
    model = tiny(name)
    assert_fused_equals_modules(model, torch.randint(0, model.config.vocab_size, (3, 6)), 16)


@pytest.mark.parametrize("overrides", [{"n_embd": 96}, {"n_embd": 120, "intermediate_size": 136}])
def test_long_contexts_split_the_keys_between_threads(overrides, two_threads):
    """3 KV heads on 2 threads: each row's 150 keys are attended in 2 parts whose softmax sums are
    merged (attention.h); a head width of 20 and an MLP of 136 take the loops' scalar tails."""
    model = tiny("tiny-llama", seed=1, n_head=6, n_kv_head=3, **overrides)
    assert_fused_equals_modules(model, torch.randint(0, model.config.vocab_size, (1, 150)), 6)


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_the_step_ends_in_logits_unless_the_head_needs_python(softcap):
    """The final norm and lm_head run in the same C++ call; a final logit softcap keeps them in PyTorch."""
    model = tiny("tiny-llama", seed=2, final_logit_softcap=softcap)
    assert_fused_equals_modules(model, torch.randint(0, 256, (2, 7)), 5)
    assert fused_decode.plan_for(model).has_head == (softcap is None)


# int4 products may round their inputs to int8 (VNNI): an input differing in the last float bit
# between the two paths can round to the next int8 step, so int4 logits agree to ~1e-2, not 1e-4.
INT4_TOLERANCE = dict(rtol=0.02, atol=0.02)


@pytest.mark.parametrize("float_v", [False, True])
def test_fused_step_runs_int4_weights_and_matches_their_modules(float_v):
    """All int4, or an fp32 v_proj (weights x4, so that it matters) beside int4 q/k in one product call."""
    model = tiny("tiny-llama")
    float_attn = tiny("tiny-llama").model.layers[0].self_attn
    quantize_model(model, QuantConfig(method="int4", group_size=32))
    if float_v:
        with torch.no_grad():
            float_attn.v_proj.weight.mul_(4)
        model.model.layers[0].self_attn.v_proj = float_attn.v_proj
    prompt = torch.randint(0, 256, (1, 5))
    fused = decode_logits(model, prompt, 8, fused=True)
    assert fused_decode.plan_for(model) is not None
    torch.testing.assert_close(fused, decode_logits(model, prompt, 8, fused=False), **INT4_TOLERANCE)


def test_plan_is_rebuilt_when_weights_are_replaced():
    """Quantizing after a fused decode must not reuse the fp32 plan (stale weights)."""
    model = tiny("tiny-llama")
    prompt = torch.randint(0, 256, (1, 5))
    decode_logits(model, prompt, 2, fused=True)
    first = fused_decode.plan_for(model)
    quantize_model(model, QuantConfig(method="int4", group_size=32))
    fused = decode_logits(model, prompt, 4, fused=True)
    assert fused_decode.plan_for(model) is not first
    torch.testing.assert_close(fused, decode_logits(model, prompt, 4, fused=False), **INT4_TOLERANCE)


def test_plan_is_rebuilt_after_a_dtype_round_trip():
    """.bfloat16().float() swaps every weight's storage but keeps the Parameter objects."""
    model = tiny("tiny-llama")
    prompt = torch.randint(0, 256, (1, 5))
    decode_logits(model, prompt, 2, fused=True)
    model.bfloat16().float()
    torch.testing.assert_close(decode_logits(model, prompt, 4, fused=True),
                               decode_logits(model, prompt, 4, fused=False), rtol=1e-4, atol=1e-4)


def test_steps_it_cannot_run_take_the_modules():
    """LoRA-wrapped linears and GPT-2's LayerNorm have no plan; left padding is masked, so no fused step."""
    lora = apply_lora(tiny("tiny-llama"), LoRAConfig(rank=2))
    assert fused_decode.build_plan(lora) is None
    assert fused_decode.build_plan(tiny("tiny-gpt2")) is None
    model = tiny("tiny-llama")
    prompts = [[5, 6, 7, 8, 9], [3, 4]]
    params = SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True)
    together = generate_ids(model, prompts, params)
    alone = [generate_ids(model, [p], params)[0] for p in prompts]
    assert together == alone


def test_greedy_generation_is_unchanged_by_the_fused_step():
    model = tiny("tiny-gemma3", seed=4)
    params = SamplingParams(max_new_tokens=24, temperature=0, ignore_eos=True)
    fused = generate_ids(model, [[1, 2, 3]], params)
    with fused_decode.disabled():
        assert generate_ids(model, [[1, 2, 3]], params) == fused


def lean_logits(model, prompt: torch.Tensor, steps: int, aligned: bool) -> tuple[torch.Tensor, KVCache]:
    """Greedy steps through decode_one_token: `aligned` takes decode_step, else model.forward (modules)."""
    cache = KVCache(model.config, prompt.shape[0], prompt.shape[1] + steps)
    pos = torch.full((prompt.shape[0], 1), prompt.shape[1])
    with torch.inference_mode():
        logits = model(prompt, cache=cache, last_only=True)[:, -1]
        out = []
        for step in range(steps):
            logits = decode_one_token(model, logits.argmax(-1), pos + step, cache, aligned)
            out.append(logits)
    return torch.stack(out, dim=1), cache


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma3"])
def test_decode_step_skips_forward_and_matches_it(name):
    """Embedding (Gemma's scale), both rope kinds, blocks and head in one call: the modules' logits,
    keys and values, and the slot positions and validity cache.reserve would have recorded."""
    model = tiny(name, seed=5)
    prompt = torch.randint(0, model.config.vocab_size, (3, 5))
    with torch.inference_mode():
        assert decode_step(model, prompt[:, 0], KVCache(model.config, 3, 4)) is not None
    lean, lean_cache = lean_logits(model, prompt, 12, aligned=True)
    slow, slow_cache = lean_logits(model, prompt, 12, aligned=False)
    torch.testing.assert_close(lean, slow, rtol=1e-4, atol=1e-4)
    assert lean_cache.length == slow_cache.length == 17
    assert torch.equal(lean_cache.positions, slow_cache.positions) and torch.equal(lean_cache.valid, slow_cache.valid)
    torch.testing.assert_close(torch.stack(lean_cache.k), torch.stack(slow_cache.k), rtol=1e-4, atol=1e-4)


def test_decode_step_leaves_what_it_cannot_run_to_forward():
    """Autograd, a disabled fused step and a full cache return None, and forward then runs or raises its error."""
    model = tiny("tiny-llama", seed=6)
    token = torch.tensor([3])
    assert decode_step(model, token, KVCache(model.config, 1, 4)) is None  # autograd on
    with torch.inference_mode():
        with fused_decode.disabled():
            assert decode_step(model, token, KVCache(model.config, 1, 4)) is None
        assert decode_step(model, token, KVCache(model.config, 1, 4)) is not None
        full = KVCache(model.config, 1, 1)
        full.length = 1
        assert decode_step(model, token, full) is None
        with pytest.raises(ValueError, match="KV cache holds 1 tokens"):
            decode_one_token(model, token, torch.tensor([[1]]), full, aligned=True)


def test_generation_takes_the_lean_step_only_without_padding(monkeypatch):
    calls = []
    monkeypatch.setattr(steps, "decode_step", lambda *a: calls.append(1) or fused_decode.decode_step(*a))
    model = tiny("tiny-llama", seed=7)
    params = SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True)
    generate_ids(model, [[1, 2, 3]], params)
    assert len(calls) == 3
    generate_ids(model, [[1, 2, 3], [4]], params)
    assert len(calls) == 3


def _paged_step(model, rows: int, slot: int = 0):
    """decode_layers_paged on `rows` rows that each attend to one key at `slot` of a 16-slot cache."""
    c = model.config
    caches = [torch.zeros(16, c.n_kv_head, c.head_dim) for _ in range(2 * c.n_layer)]
    slots = torch.full((rows,), slot)
    return gemv.extension().decode_layers_paged(
        fused_decode.plan_for(model), torch.randn(rows, c.n_embd), caches[:c.n_layer], caches[c.n_layer:], slots,
        [slots[:, None]], [torch.ones(rows, dtype=torch.long)], [torch.ones(rows, c.head_dim)],
        [torch.zeros(rows, c.head_dim)])


def test_paged_step_refuses_what_it_cannot_run():
    """int4 products compute at most 8 rows (silently 8 of more), so 9 int4 rows are refused while 9
    fp32 rows run; a slot outside the cache is refused rather than read."""
    model = tiny("tiny-llama")
    assert not fused_decode.plan_for(model).has_int4
    assert _paged_step(model, 9).shape == (9, model.config.n_embd)
    with pytest.raises(RuntimeError, match="slots of the cache"):
        _paged_step(model, 2, slot=16)
    quantize_model(model, QuantConfig(method="int4", group_size=32))
    assert fused_decode.plan_for(model).has_int4
    assert _paged_step(model, 8).shape == (8, model.config.n_embd)
    with pytest.raises(RuntimeError, match="1 to 8 rows with int4 weights, got 9"):
        _paged_step(model, 9)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma3"])
@pytest.mark.parametrize("prompt_len, chunk", [(1, 1), (11, 6), (3, 17)])
def test_chunk_step_equals_forward_over_several_tokens(name, prompt_len, chunk):
    """Speculative decoding's verify step: T tokens of one sequence attend causally to the cache and to each
    other (Gemma's window of 8 trims the oldest keys); logits, keys and slot bookkeeping equal forward's."""
    model = tiny(name, seed=8)
    prompt = torch.randint(0, model.config.vocab_size, (1, prompt_len))
    tokens = torch.randint(0, model.config.vocab_size, (chunk,))
    caches = [KVCache(model.config, 1, 40) for _ in range(2)]
    with torch.inference_mode():
        for cache in caches:
            model(prompt, cache=cache)
        fused = fused_decode.chunk_step(model, tokens, caches[0])
        reference = model(tokens[None], cache=caches[1])[0]
        with fused_decode.disabled():
            assert fused_decode.chunk_step(model, tokens, KVCache(model.config, 1, 40)) is None
    assert fused is not None
    torch.testing.assert_close(fused, reference, rtol=1e-4, atol=1e-4)
    assert caches[0].length == caches[1].length == prompt_len + chunk
    assert torch.equal(caches[0].positions, caches[1].positions) and torch.equal(caches[0].valid, caches[1].valid)
    filled = prompt_len + chunk  # the slots past it were never written (torch.empty)
    torch.testing.assert_close(torch.stack(caches[0].k)[..., :filled, :], torch.stack(caches[1].k)[..., :filled, :],
                               rtol=1e-4, atol=1e-4)
