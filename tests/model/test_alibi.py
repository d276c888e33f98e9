"""ALiBi: slopes equal BLOOM's, one attention layer equals the formula written out, and the bias holds
through padding, the KV cache and the training objective."""

from __future__ import annotations

import pytest
import torch

from lmforge.config import Config
from lmforge.generation.kv_cache import KVCache
from lmforge.model.alibi import alibi_slopes
from lmforge.model.masks import positions_from_padding
from lmforge.model.transformer import build_model, init_weights


@pytest.mark.parametrize("n_head", [1, 4, 6, 12, 16])
def test_slopes_equal_bloom(n_head):
    bloom = pytest.importorskip("transformers.models.bloom.modeling_bloom")
    mask = torch.ones(1, 3)
    # BLOOM's tensor is slope * position (0, 1, 2): position 1 holds the slope itself
    want = bloom.build_alibi_tensor(mask, n_head, torch.float32).view(n_head, 3)[:, 1]
    torch.testing.assert_close(alibi_slopes(n_head), want)


def _model(**kw):
    torch.manual_seed(0)
    model = build_model(Config.from_name("tiny-alibi", **kw)).eval()
    init_weights(model, std=0.1)  # large enough that positions decide the greedy tokens
    return model


@pytest.mark.parametrize("attn_impl", ["sdpa", "math"])
def test_attention_layer_equals_the_formula(attn_impl):
    """softmax(q k^T / sqrt(d) + m_h (j - i)) v over j <= i, per head, GQA keys shared."""
    model = _model(attn_impl=attn_impl)
    attn = model.model.layers[0].self_attn
    x = torch.randn(1, 10, 64)
    H, KV, D = attn.n_head, attn.n_kv_head, attn.head_dim
    q = attn.q_proj(x).view(10, H, D).transpose(0, 1)
    k = attn.k_proj(x).view(10, KV, D).transpose(0, 1).repeat_interleave(H // KV, 0)
    v = attn.v_proj(x).view(10, KV, D).transpose(0, 1).repeat_interleave(H // KV, 0)
    slopes = [2 ** (-8 * (h + 1) / H) for h in range(H)]  # the paper's series for a power of two
    out = torch.empty(H, 10, D)
    for h in range(H):
        for i in range(10):
            s = torch.stack([q[h, i] @ k[h, j] / D ** 0.5 + slopes[h] * (j - i) for j in range(i + 1)])
            out[h, i] = s.softmax(0) @ v[h, : i + 1]
    want = attn.o_proj(out.transpose(0, 1).reshape(1, 10, H * D))
    pos = torch.arange(10)[None]
    from lmforge.model.attention import AttentionContext
    from lmforge.model.masks import attention_mask

    ctx = AttentionContext(None, model.alibi(pos, pos, attention_mask(pos, pos, None)), False, None, 0, 0)
    with torch.no_grad():
        torch.testing.assert_close(attn(x, ctx), want, atol=1e-5, rtol=1e-5)


def test_left_padding_and_cache_give_the_same_logits():
    model = _model()
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        full = model(ids)
        padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1)
        valid = torch.cat([torch.zeros(1, 3, dtype=torch.bool), torch.ones(1, 12, dtype=torch.bool)], 1)
        got = model(padded, positions=positions_from_padding(valid), valid=valid)[:, 3:]
        torch.testing.assert_close(got, full, atol=1e-5, rtol=1e-5)
        cache = KVCache(model.config, 1, 32)
        steps = [model(ids[:, :8], cache=cache)] + [model(ids[:, t:t + 1], cache=cache) for t in range(8, 12)]
        torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_training_loss_uses_the_bias():
    from lmforge.training.objectives import pretrain_loss

    model = _model()
    ids = torch.randint(0, 256, (2, 16))
    batch = {"input_ids": ids, "positions": torch.arange(16).expand(2, 16)}
    loss = pretrain_loss(model, batch)
    with torch.no_grad():
        logits = model(ids)[:, :-1].reshape(-1, 256)
    want = torch.nn.functional.cross_entropy(logits, ids[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, want, atol=1e-5, rtol=1e-5)
    loss.backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


def test_generation_equals_greedy_by_hand():
    from lmforge.generation.generate import generate_ids
    from lmforge.generation.sampling import SamplingParams

    model = _model()
    out = generate_ids(model, [[1, 2, 3]], SamplingParams(max_new_tokens=5, temperature=0.0))
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        for _ in range(5):  # greedy by hand, no cache
            ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], 1)
    assert out == [ids[0, 3:].tolist()]
