"""Sparse attention: each pattern's mask follows its rule; the block-sparse kernel (outputs and gradients)
equals dense attention with the same mask; a model mixing sparse and full layers equals its dense masked
path in logits, training gradients and generation; bad patterns fail at config time."""

from __future__ import annotations

import pytest
import torch

from lmforge.config import Config
from lmforge.generation.fused_decode import supported_architecture
from lmforge.generation.generate import generate_ids
from lmforge.generation.sampling import SamplingParams
from lmforge.model import sparse
from lmforge.model.attention import math_attention
from lmforge.model.masks import attention_mask, layer_schedule, positions_from_padding, random_block_table
from lmforge.model.sparse import block_layout, block_ranges, block_sparse_attention, build_plan
from lmforge.model.transformer import build_model, init_weights
from lmforge.training.objectives import pretrain_loss

PATTERNS = {
    "local": {"window": 5},
    "dilated": {"window": 4, "dilation": 3},
    "strided": {"window": 6, "stride": 7},  # Child et al.: local + every 7th key back
    "block": {"block": 8},
    "global": {"global_tokens": 3},
    "local+global": {"window": 4, "global_tokens": 3},
    "random": {"random_blocks": 2, "random_block_size": 8, "seed": 3},
    "bigbird": {"window": 6, "global_tokens": 2, "random_blocks": 1, "random_block_size": 4},
}


def _rule(pattern: dict, i: int, j: int) -> bool:
    """The pattern's definition for one query and key position, written out (the masks' reference)."""
    if j > i:
        return False
    d = pattern.get("dilation", 1)
    seen = [pattern.get("window", 0) and i - j < pattern["window"] * d and (i - j) % d == 0,
            pattern.get("stride", 0) and (i - j) % pattern["stride"] == 0,
            pattern.get("block", 0) and i // pattern["block"] == j // pattern["block"],
            j < pattern.get("global_tokens", 0) or i < pattern.get("global_tokens", 0)]
    if pattern.get("random_blocks"):
        size = pattern["random_block_size"]
        seen.append(j // size in random_block_table(pattern, i // size + 1)[i // size].tolist())
    return bool(any(seen))


def _padded_positions(T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows: one left-padded by 7 tokens, one full."""
    valid = torch.ones(2, T, dtype=torch.bool)
    valid[0, :7] = False
    return positions_from_padding(valid), valid


@pytest.mark.parametrize("name", PATTERNS)
def test_mask_follows_the_rule(name):
    pattern = PATTERNS[name]
    pos = torch.arange(40)[None]
    mask = attention_mask(pos, pos, None, pattern=pattern)[0, 0]
    expected = torch.tensor([[_rule(pattern, i, j) for j in range(40)] for i in range(40)])
    assert torch.equal(mask, expected)
    assert bool(mask.any(-1).all()), "a query was left with no key"


@pytest.mark.parametrize("name", PATTERNS)
@pytest.mark.parametrize("n_head,n_kv_head", [(4, 4), (4, 2), (4, 1)])  # MHA, GQA, MQA
@pytest.mark.parametrize("padded", [False, True])
def test_kernel_equals_dense_attention(name, n_head, n_kv_head, padded):
    pattern, T = PATTERNS[name], 45  # 45 = 2 blocks of 16 and a partial one
    if padded:
        pos, valid = _padded_positions(T)
    else:
        pos, valid = torch.arange(T).expand(2, T), None
    q = torch.randn(2, n_head, T, 8, requires_grad=True)
    k, v = (torch.randn(2, n_kv_head, T, 8, requires_grad=True) for _ in range(2))
    plan = build_plan(pattern, pos, pos, valid, block=16)
    out = block_sparse_attention(q, k, v, plan, 0.3)
    ref = math_attention(q, k, v, attention_mask(pos, pos, valid, pattern=pattern), False, 0.3)
    torch.testing.assert_close(out, ref)
    grad = torch.randn_like(out)
    for got, want in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
        torch.testing.assert_close(got, want)


def test_kernel_with_softcap_over_a_longer_key_range():
    """Queries at the end of a cache (S > T), with Gemma 2's logit softcap: forward and gradients."""
    pattern, S, T = PATTERNS["bigbird"], 70, 20
    k_pos, q_pos = torch.arange(S)[None], torch.arange(S - T, S)[None]
    q = torch.randn(1, 4, T, 8, requires_grad=True)
    k, v = (torch.randn(1, 2, S, 8, requires_grad=True) for _ in range(2))
    plan = build_plan(pattern, q_pos, k_pos, block=16)
    out = block_sparse_attention(q, k, v, plan, 0.5, softcap=2.0)
    ref = math_attention(q, k, v, attention_mask(q_pos, k_pos, None, pattern=pattern), False, 0.5, softcap=2.0)
    torch.testing.assert_close(out, ref)
    grad = torch.randn_like(out)
    for got, want in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
        torch.testing.assert_close(got, want)


def _exact_tiles(mask: torch.Tensor, block: int) -> torch.Tensor:
    """(nQ, nK): tiles of a (T, S) mask holding at least one visible key."""
    T, S = mask.shape
    n_q, n_k = -(-T // block), -(-S // block)
    full = torch.zeros(n_q * block, n_k * block, dtype=torch.bool)
    full[:T, :S] = mask
    return full.view(n_q, block, n_k, block).any(3).any(1)


@pytest.mark.parametrize("name", PATTERNS)
@pytest.mark.parametrize("block", [4, 16])
def test_layout_skips_exactly_the_empty_tiles(name, block):
    """Without padding the layout is the set of non-empty tiles; with padding it still holds every one."""
    pattern, T = PATTERNS[name], 100
    for pos, valid in ((torch.arange(T)[None], torch.ones(1, T, dtype=torch.bool)), _padded_positions(T)):
        n = -(-T // block) * block
        real = sparse._pad(torch.ones_like(valid), n, -1, False)  # every query, padding included, needs keys
        q_ranges = block_ranges(sparse._pad(pos, n, -1), real, block)
        k_ranges = block_ranges(sparse._pad(pos, n, -1), sparse._pad(valid, n, -1, False), block)
        layout = block_layout(pattern, *q_ranges, *k_ranges)
        for row in range(pos.shape[0]):
            exact = _exact_tiles(attention_mask(pos, pos, valid, pattern=pattern)[row, 0], block)
            assert bool((layout[row] >= exact).all())
            if bool(valid[row].all()):
                assert torch.equal(layout[row], exact)


def test_compute_follows_the_pattern():
    """A 256 window + 16 global tokens at 2048 tokens: query block b reads key blocks b-4..b and block 0,
    6 of 32 at most, 177 tiles of the 528 causal ones."""
    pos = torch.arange(2048)[None]
    plan = build_plan({"window": 256, "global_tokens": 16}, pos, pos, block=64)
    assert plan.index.shape[1] == 6
    assert plan.tiles == sum(min(b + 1, 5) + (b >= 5) for b in range(32)) == 177


def test_random_blocks_are_seeded_and_stable():
    pattern = PATTERNS["random"]
    table = random_block_table(pattern, 20)
    assert torch.equal(table, random_block_table(pattern, 20))
    assert torch.equal(table[:7], random_block_table(pattern, 7)), "a row depends on the sequence length"
    assert not torch.equal(table, random_block_table({**pattern, "seed": 4}, 20))
    rows = table[2:]
    assert bool(((rows >= 0) & (rows <= torch.arange(2, 20)[:, None])).all())  # causal draws, r per row


def test_layer_schedule():
    assert layer_schedule(6, ["local"], 3) == ["local", "local", "global"] * 2
    assert layer_schedule(4, ["a", "b"]) == ["a", "b", "a", "b"]
    assert layer_schedule(5, ["a", "b"], 2) == ["a", "global", "b", "global", "a"]


def _sparse_model(**overrides) -> torch.nn.Module:
    patterns = {"local": {"window": 24, "global_tokens": 4},
                "bigbird": {"window": 16, "global_tokens": 2, "random_blocks": 2, "random_block_size": 16, "seed": 1}}
    config = Config.from_name("tiny-llama", n_layer=4, layer_types=layer_schedule(4, ["local", "bigbird"], 3),
                              sparse_patterns=patterns, **overrides)
    model = build_model(config)
    init_weights(model, std=0.2)  # larger weights than GPT-2's, so greedy tokens vary
    return model.eval()


@pytest.mark.parametrize("padded", [False, True])
def test_model_logits_equal_the_dense_masked_path(padded):
    model = _sparse_model()
    ids = torch.randint(0, 256, (2, 150))  # 3 blocks of 64, the last partial
    kwargs = {}
    if padded:
        pos, valid = _padded_positions(150)
        kwargs = {"positions": pos, "valid": valid}
    with torch.no_grad():
        got = model(ids, **kwargs)
        with sparse.dense():
            want = model(ids, **kwargs)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_training_gradients_equal_the_dense_masked_path():
    """pretrain_loss over packed rows (two examples in one row): same loss and parameter gradients."""
    model = _sparse_model().train()
    ids = torch.randint(0, 256, (2, 140))
    positions = torch.cat([torch.arange(90), torch.arange(50)]).expand(2, -1)
    seq_ids = torch.cat([torch.zeros(90, dtype=torch.long), torch.ones(50, dtype=torch.long)]).expand(2, -1)
    batch = {"input_ids": ids, "positions": positions, "seq_ids": seq_ids}

    def loss_and_grads():
        model.zero_grad()
        loss = pretrain_loss(model, batch)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    loss, grads = loss_and_grads()
    with sparse.dense():
        ref_loss, ref_grads = loss_and_grads()
    torch.testing.assert_close(loss, ref_loss)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_generation_equals_recomputing_without_a_cache():
    """Prefill (block-sparse over the cache) and decode (dense pattern mask) give the tokens that a full
    forward per step gives; the fused C++ decode stays off for sparse models."""
    model = _sparse_model()
    assert not supported_architecture(model.config)
    prompts = [torch.randint(0, 256, (100,)).tolist(), torch.randint(0, 256, (130,)).tolist()]
    got = generate_ids(model, prompts, SamplingParams(max_new_tokens=12, temperature=0))
    for prompt, tokens in zip(prompts, got):
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(12):
                ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
        assert tokens == ids[len(prompt):]
    assert len(set(got[0])) > 1, "the model repeats one token; the comparison would be weak"


def test_serving_engine_refuses_sparse_models():
    from lmforge.serving.model_runner import ModelRunner

    with pytest.raises(ValueError, match="sparse_patterns"):
        ModelRunner(_sparse_model(), None)


def test_exports_refuse_sparse_models(tmp_path):
    from lmforge.checkpoint.gguf_export import architecture
    from lmforge.checkpoint.hf import save_hf

    model = _sparse_model()
    with pytest.raises(ValueError, match="sparse_patterns"):
        architecture(model.config)
    with pytest.raises(ValueError, match="sparse_patterns"):
        save_hf(model, tmp_path / "hf")


def _config(patterns: dict, types: list[str] | None = None, **overrides) -> Config:
    return Config.from_name("tiny-llama", layer_types=types or ["local", "global"], sparse_patterns=patterns,
                            **overrides)


@pytest.mark.parametrize("patterns,types,overrides,match", [
    ({"local": {"window": 8}}, ["local", "locl"], {}, r"layer_types names kinds \['locl'\]"),
    ({"local": {"window": 8, "windw": 2}}, None, {}, r"unknown keys \['windw'\]"),
    ({"local": {"window": 512}}, None, {}, r"\['window'\] spans 512 positions, more than the context block_size=256"),
    ({"local": {"window": 100, "dilation": 3}}, None, {}, r"spans 300 positions"),
    ({"local": {"block": 300}}, None, {}, r"\['block'\] spans 300"),
    ({"local": {}}, None, {}, "leaves every query with no key"),
    ({"local": {"global_tokens": 0}}, None, {}, "leaves every query with no key"),
    ({"local": {"window": -1}}, None, {}, r"\['window'\]=-1 must be an int >= 0"),
    ({"local": {"window": 8.0}}, None, {}, r"must be an int"),
    ({"local": {"dilation": 2}}, None, {}, "dilation without window"),
    ({"local": {"window": 4, "seed": 2}}, None, {}, "without random_blocks"),
    ({"local": {"window": 8}, "spare": {"window": 4}}, None, {}, r"sparse_patterns\['spare'\] is used by no layer"),
    ({"sliding": {"window": 8}}, ["sliding", "global"], {}, "built-in layer kind"),
    ({"local": {"window": 8}}, None, {"position": "alibi"}, "ALiBi"),
])
def test_bad_patterns_fail_at_config_time(patterns, types, overrides, match):
    with pytest.raises(ValueError, match=match):
        _config(patterns, types, **overrides)


def test_a_sparse_config_round_trips_through_json(tmp_path):
    config = _config({"local": {"window": 8, "global_tokens": 2}})
    path = tmp_path / "config.json"
    path.write_text(__import__("json").dumps(config.to_dict()))
    assert Config.from_file(path) == config
