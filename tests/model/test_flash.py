"""CPU flash attention (model/flash.py) against torch's attention in float64, in a model, in training."""

from __future__ import annotations

import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from lmforge.config import PRESETS, Config
from lmforge.model import flash
from lmforge.model.flash import flash_attention, lengths_to_valid, split_mask
from lmforge.model.transformer import build_model
from lmforge.training.objectives import pretrain_loss


def reference(q, k, v, causal: bool, key_valid: torch.Tensor | None, scale: float) -> torch.Tensor:
    """torch SDPA in float64 over an explicit bool mask (bottom-right causal, as after a KV cache)."""
    T, S = q.shape[2], k.shape[2]
    mask = torch.ones(q.shape[0], 1, T, S, dtype=torch.bool)
    if causal:
        mask &= torch.ones(T, S, dtype=torch.bool).tril(S - T)
    if key_valid is not None:
        mask &= key_valid[:, None, None, :]
    q, k, v = q.double(), k.double(), v.double()
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1])


def inputs(B: int, H: int, H_kv: int, T: int, S: int, D: int = 16) -> tuple[torch.Tensor, ...]:
    return tuple(torch.randn(B, h, n, D, requires_grad=True) for h, n in ((H, T), (H_kv, S), (H_kv, S)))


def assert_matches(q, k, v, causal, key_valid, scale=0.3, **blocks) -> None:
    """Output and the gradients of q, k and v equal the float64 reference within fp32 tolerance."""
    out = flash_attention(q, k, v, causal=causal, scale=scale, key_valid=key_valid, **blocks)
    ref = reference(q, k, v, causal, key_valid, scale)
    torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=1e-5)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref, (q, k, v), grad.double())
    for name, g, w in zip("qkv", got, want):
        torch.testing.assert_close(g.double(), w.double(), atol=1e-5, rtol=1e-5, msg=lambda m: f"d{name}: {m}")


CASES = {  # (B, H, H_kv, T, S): tile edges fall inside the sequence (blocks of 16 and 32)
    "mha": (2, 4, 4, 45, 45),
    "gqa": (2, 6, 2, 45, 45),
    "mqa": (1, 4, 1, 70, 70),
    "prefill T<S": (2, 4, 2, 21, 67),
    "decode T=1": (2, 4, 2, 1, 40),
}


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("case", CASES)
def test_equals_sdpa_with_small_tiles(case, causal):
    q, k, v = inputs(*CASES[case])
    assert_matches(q, k, v, causal, None, block_q=16, block_k=32)


@pytest.mark.parametrize("causal", [True, False])
def test_equals_sdpa_with_default_tiles(causal):
    q, k, v = inputs(1, 4, 2, 700, 1100)  # several default tiles, the last ones partial
    assert_matches(q, k, v, causal, None)


@pytest.mark.parametrize("causal", [True, False])
def test_ragged_key_lengths(causal):
    q, k, v = inputs(3, 4, 2, 30, 77)
    valid = lengths_to_valid(torch.tensor([77, 60, 31]), 77)  # row 2's last 46 keys are padding
    assert_matches(q, k, v, causal, valid, block_q=8, block_k=16)


def test_key_validity_with_holes_and_empty_rows():
    q, k, v = inputs(2, 2, 1, 24, 24)
    valid = torch.rand(2, 24) > 0.4
    valid[1, :6] = False  # causal: queries 0-5 of row 1 see no key
    assert_matches(q, k, v, False, valid, block_q=8, block_k=8)
    out = flash_attention(q, k, v, causal=True, key_valid=valid, block_q=8, block_k=8)
    assert torch.equal(out[1, :, :6], torch.zeros_like(out[1, :, :6]))  # zero, not NaN
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    ref = reference(q[1:, :, 6:], k[1:], v[1:], True, valid[1:], 16 ** -0.5)  # its rows that see keys
    torch.testing.assert_close(out[1:, :, 6:].double(), ref, atol=2e-6, rtol=1e-5)


def test_bfloat16_inputs_track_fp32():
    q, k, v = (x.detach().bfloat16() for x in inputs(1, 2, 1, 40, 40))
    out = flash_attention(q, k, v, causal=True, block_q=16, block_k=16)
    assert out.dtype == torch.bfloat16
    ref = reference(q, k, v, True, None, 16 ** -0.5)
    torch.testing.assert_close(out.double(), ref, atol=1e-2, rtol=1e-2)


def test_causal_skips_masked_tiles(monkeypatch):
    """4 x 4 tiles: causal computes the 10 on or below the diagonal, forward and backward alike."""
    calls = []
    real = flash._tile_scores
    monkeypatch.setattr(flash, "_tile_scores", lambda *a: calls.append(a[-4:]) or real(*a))
    q, k, v = inputs(1, 2, 2, 64, 64)
    flash_attention(q, k, v, causal=True, block_q=16, block_k=16).sum().backward()
    assert len(calls) == 20 and all(j0 <= i0 for i0, _, j0, _ in calls)
    calls.clear()
    flash_attention(q, k, v, causal=False, block_q=16, block_k=16).sum().backward()
    assert len(calls) == 32


def test_dead_key_tiles_are_skipped(monkeypatch):
    calls = []
    real = flash._tile_scores
    monkeypatch.setattr(flash, "_tile_scores", lambda *a: calls.append(a[-2:]) or real(*a))
    q, k, v = inputs(2, 2, 2, 16, 64)
    valid = lengths_to_valid(torch.tensor([20, 30]), 64)  # keys 32-63 padding in every row
    flash_attention(q, k, v, key_valid=valid, block_q=16, block_k=16)
    assert sorted(calls) == [(0, 16), (16, 32)]


def test_bad_shapes_are_clear_errors():
    q, k, v = inputs(1, 3, 2, 8, 8)
    with pytest.raises(ValueError, match="multiple of n_kv_head"):
        flash_attention(q, k, v)
    q, k, v = inputs(1, 2, 2, 8, 8)
    with pytest.raises(ValueError, match="key_valid must be bool"):
        flash_attention(q, k, v, key_valid=torch.ones(1, 7, dtype=torch.bool))


# --- the model: attn_impl="flash" ---------------------------------------------------------------

def test_split_mask_reads_causal_and_key_validity():
    from lmforge.model.masks import attention_mask, positions_from_padding

    pos = torch.arange(10).expand(2, 10)
    valid = torch.ones(2, 10, dtype=torch.bool)
    assert split_mask(attention_mask(pos, pos, valid)) == (True, None)
    valid[1, 7:] = False
    causal, keys = split_mask(attention_mask(pos[:, 6:], pos, valid))  # T=4 queries after a cache of 6
    assert causal and torch.equal(keys, valid)
    assert split_mask(attention_mask(pos, pos, None, window=3)) is None  # sliding window
    left = torch.ones(2, 10, dtype=torch.bool)
    left[0, :3] = False  # left padding, positions counting real tokens: pad queries see key 3
    lpos = positions_from_padding(left)
    causal, keys = split_mask(attention_mask(lpos, lpos, left))
    assert causal and torch.equal(keys, left)
    packed = attention_mask(pos, pos, None) & (pos[:, :, None] // 5 == pos[:, None, :] // 5)[:, None]
    assert split_mask(packed) is None  # two packed examples: a real query's row is not causal
    causal, keys = split_mask(valid[:, None, None, :].expand(2, 1, 5, 10))  # padding only, no causality
    assert not causal and torch.equal(keys, valid)
    assert split_mask(torch.zeros(2, 1, 4, 10)) is None  # a float bias (ALiBi) is not a bool mask


def _pair(name: str, **overrides):
    ref = build_model(Config.from_name(name, attn_impl="sdpa", **overrides))
    got = build_model(Config.from_name(name, attn_impl="flash", **overrides))
    got.load_state_dict(ref.state_dict())
    return ref, got


@pytest.fixture
def flash_calls(monkeypatch):
    """Counts calls of flash_attention made by the model."""
    calls = []
    real = flash.flash_attention
    monkeypatch.setattr(flash, "flash_attention", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    return calls


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_model_logits_and_grads_equal_sdpa(name, flash_calls):
    ref, got = _pair(name)
    ids = torch.randint(0, 256, (2, 50))
    a, b = ref(ids), got(ids)
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    assert len(flash_calls) == ref.config.n_layer and flash_calls[0]["causal"]
    a.square().mean().backward()
    b.square().mean().backward()
    grads = dict(ref.named_parameters())
    for n, p in got.named_parameters():
        torch.testing.assert_close(p.grad, grads[n].grad, atol=1e-6, rtol=1e-4, msg=n)


@pytest.mark.parametrize("name", sorted(n for n in PRESETS if n.startswith("tiny-")))
def test_every_tiny_preset_gives_sdpa_logits(name):
    """Positions, MoE, hybrids, ALiBi and T5's relative bias (float biases: SDPA runs them): attn_impl="flash"
    changes no logit."""
    ref, got = _pair(name)
    ids = torch.randint(0, min(256, ref.config.vocab_size), (2, 30))
    args = (ids, ids[:, :12]) if ref.config.arch == "encoder_decoder" else (ids,)  # T5: encoder and decoder ids
    torch.testing.assert_close(got(*args), ref(*args), atol=1e-5, rtol=1e-5)


def test_model_padding_and_cache_run_flash(flash_calls):
    """Right padding is causal + key validity; a prefill after a cache is causal with T < S."""
    from lmforge.generation.kv_cache import KVCache

    ref, got = _pair("tiny-llama")
    ids = torch.randint(0, 256, (2, 30))
    valid = torch.ones(2, 30, dtype=torch.bool)
    valid[1, 22:] = False
    torch.testing.assert_close(got(ids, valid=valid), ref(ids, valid=valid), atol=1e-5, rtol=1e-5)
    assert flash_calls and flash_calls[-1]["key_valid"] is not None
    caches = [KVCache(m.config, 1, 40) for m in (ref, got)]
    for chunk in (ids[:1, :18], ids[:1, 18:]):
        flash_calls.clear()
        a, b = ref(chunk, cache=caches[0]), got(chunk, cache=caches[1])
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    assert flash_calls and flash_calls[-1]["causal"]  # the 12-token chunk over 30 cached keys


def test_left_padded_batch_generates_as_sdpa(flash_calls):
    """Batched generation left-pads prompts of different lengths; its prefill runs flash."""
    from lmforge.generation.generate import generate_ids
    from lmforge.generation.sampling import SamplingParams

    ref, got = _pair("tiny-llama")
    prompts = [[5, 6, 7], list(range(20, 37))]
    params = SamplingParams(max_new_tokens=8, temperature=0)
    assert generate_ids(got, prompts, params) == generate_ids(ref, prompts, params)
    assert any(call["key_valid"] is not None for call in flash_calls)


def test_sliding_window_layers_fall_back_to_sdpa(flash_calls):
    ref, got = _pair("tiny-gemma3")  # 5 of 6 layers slide over 8 keys, the 6th is global
    ids = torch.randint(0, 256, (1, 20))
    torch.testing.assert_close(got(ids), ref(ids), atol=1e-5, rtol=1e-5)
    assert len(flash_calls) == 1


def test_training_objective_gradients_equal_sdpa(flash_calls):
    ref, got = _pair("tiny-llama")
    ids = torch.randint(0, 256, (2, 40))
    batch = {"input_ids": ids, "positions": torch.arange(40).expand(2, 40)}
    loss_ref, loss = pretrain_loss(ref, batch), pretrain_loss(got, batch)
    torch.testing.assert_close(loss, loss_ref, atol=1e-6, rtol=1e-6)
    loss_ref.backward()
    loss.backward()
    assert flash_calls
    grads = dict(ref.named_parameters())
    for n, p in got.named_parameters():
        torch.testing.assert_close(p.grad, grads[n].grad, atol=1e-6, rtol=1e-4, msg=n)


# --- memory: linear in the sequence length ---------------------------------------------------

class LiveBytes(TorchDispatchMode):
    """Peak bytes of tensor storage alive at once among those the ops under it create."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: dict[int, int] = {}
        self.size: dict[int, int] = {}
        self.now = self.peak = 0

    def _drop(self, key: int) -> None:
        self.refs[key] -= 1
        if not self.refs[key]:
            del self.refs[key]
            self.now -= self.size.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key not in self.refs:
                    self.refs[key], self.size[key] = 0, storage.nbytes()
                    self.now += storage.nbytes()
                    self.peak = max(self.peak, self.now)
                self.refs[key] += 1
                weakref.finalize(t, self._drop, key)
        return out


def peak_bytes(attention, T: int) -> int:
    """Peak live bytes of one causal forward + backward at T tokens (2 query heads, 1 key/value head)."""
    q, k, v = inputs(1, 2, 1, T, T, D=32)
    with LiveBytes() as live:
        attention(q, k, v).sum().backward()
    return live.peak


def test_peak_memory_grows_linearly():
    def tiled(q, k, v):
        return flash_attention(q, k, v, causal=True, block_q=128, block_k=128)

    def full(q, k, v):  # the T x S scores, as SDPA's math path builds them
        return reference(q, k, v, True, None, 0.2)

    small, large = peak_bytes(tiled, 1024), peak_bytes(tiled, 2048)
    assert 1.5 < large / small < 2.2
    assert large < 12 * 2 * 2048 * 32 * 4  # about a dozen (T, D) fp32 tensors, no (T, T) one
    assert peak_bytes(full, 2048) / peak_bytes(full, 1024) > 3.5  # the meter sees quadratic growth
