"""Speculative decoding is exact: greedy ids equal plain greedy's, sampled tokens follow the target's
distribution (chi-square against the model's own probabilities), and the cache rolls back cleanly."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from lmforge.config import Config
from lmforge.generation import speculative
from lmforge.generation.drafts import ModelDraft, NgramDraft
from lmforge.generation.generate import generate_ids, prefill
from lmforge.generation.kv_cache import KVCache
from lmforge.generation.sampling import SamplingParams, apply_repetition_penalty, token_probabilities
from lmforge.generation.speculative import SpeculativeStream, speculative_ids, verify_sampled
from lmforge.model.transformer import build_model, init_weights

PROMPT = [7, 3, 9, 1, 7, 3, 9, 1, 7, 3]  # repeats, so the n-gram draft finds matches at once


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a busy machine a second one stalls every small op."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(seed: int, preset: str = "tiny-llama", std: float = 0.2, **overrides) -> torch.nn.Module:
    """A random model whose logits are spread enough (std) that greedy picks are not near-ties."""
    torch.manual_seed(seed)
    model = build_model(Config.from_name(preset, **overrides)).eval()
    init_weights(model, std=std)
    return model


@pytest.fixture(scope="module")
def target():
    return tiny(0)


def drafts(target, kind: str, k: int | None):
    if kind == "ngram":
        return NgramDraft(k=k)
    return ModelDraft(target if kind == "self" else tiny(1), k=k)


@pytest.mark.parametrize("kind", ["ngram", "other", "self"])
@pytest.mark.parametrize("k", [1, 4, None])
def test_greedy_ids_equal_plain_greedy_with_length_and_eos_limits(target, kind, k):
    plain = generate_ids(target, [PROMPT], SamplingParams(max_new_tokens=40, temperature=0))[0]
    eos = next(t for i, t in enumerate(plain) if i >= 9 and t not in plain[:i])  # first hit mid-generation
    for params, eos_ids in [(SamplingParams(max_new_tokens=23, temperature=0), set()),
                            (SamplingParams(max_new_tokens=40, temperature=0), {eos}),
                            (SamplingParams(max_new_tokens=30, temperature=0, repetition_penalty=1.3), set())]:
        expected = generate_ids(target, [PROMPT], params, eos_ids)[0]
        got, stats = speculative_ids(target, [PROMPT], params, drafts(target, kind, k), eos_ids)
        assert got[0] == expected
        assert stats["tokens"] == len(expected) and stats["accepted"] <= stats["drafted"]
    if kind == "self":  # a perfect draft: every guess kept, one target forward per k + 1 tokens
        assert stats["acceptance_rate"] == 1.0
        assert stats["target_forwards"] <= 1 + math.ceil(len(expected) / ((k or 4) + 1))


def test_greedy_several_prompts_and_a_sliding_window_model():
    model = tiny(2, "tiny-gemma3")  # sliding window 8 < prompt + k, so verify masks cut old keys
    prompts = [PROMPT, [4, 4, 4, 4], [11]]
    params = SamplingParams(max_new_tokens=25, temperature=0)
    expected = [generate_ids(model, [p], params)[0] for p in prompts]
    for draft in (NgramDraft(), ModelDraft(model), ModelDraft(tiny(3, "tiny-gemma3"), k=3)):
        assert speculative_ids(model, prompts, params, draft)[0] == expected


def test_finish_mid_run_stops_the_row_and_never_exceeds_max_new(target):
    params = SamplingParams(max_new_tokens=12, temperature=0)
    stream = SpeculativeStream(target, [PROMPT, PROMPT], params, set(), draft=ModelDraft(target, k=8))
    seen: list[list[int | None]] = []
    for tokens in stream:
        seen.append(tokens)
        if len(seen) == 3:  # a stop string found by the caller, inside an accepted run of 8
            stream.finish(0, "stop")
    assert sum(t[0] is not None for t in seen) == 3 and sum(t[1] is not None for t in seen) == 12
    assert stream.reasons == ["stop", "length"]


def exact_two_token_distribution(model, prompt: list[int], params: SamplingParams) -> torch.Tensor:
    """P(t1, t2) (V, V) computed independently: the target's logits, the penalty, token_probabilities."""
    def probs(ids: torch.Tensor) -> torch.Tensor:
        logits = apply_repetition_penalty(model(ids)[:, -1].float(), ids, params.repetition_penalty)
        return token_probabilities(logits, params)

    with torch.no_grad():
        first = probs(torch.tensor([prompt]))[0]  # (V,)
        V = first.numel()
        both = torch.cat([torch.tensor([prompt]).expand(V, -1), torch.arange(V)[:, None]], dim=1)
        return (first[:, None] * probs(both)).double()  # (V, V)


def chi_square_ok(counts: Counter, expected_p: torch.Tensor, n: int, alpha_z: float = 3.09) -> bool:
    """Pearson's chi-square at alpha 0.001; cells expecting < 5 draws are pooled into one."""
    flat = expected_p.flatten() * n
    big = flat >= 5
    observed = torch.zeros_like(flat)
    for cell, count in counts.items():
        observed[cell] = count
    obs = torch.cat([observed[big], observed[~big].sum()[None]])
    exp = torch.cat([flat[big], flat[~big].sum()[None]])
    keep = exp > 0
    if bool((obs[~keep] > 0).any()):  # a draw the target gives probability 0
        return False
    stat, df = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()), int(keep.sum()) - 1
    try:
        from scipy.stats import chi2
        return stat < chi2.ppf(0.999, df)
    except ImportError:  # Wilson-Hilferty: the chi-square quantile from the normal one, z(0.999) = 3.09
        return stat < df * (1 - 2 / (9 * df) + alpha_z * math.sqrt(2 / (9 * df))) ** 3


def draw_pairs(target, draft, params: SamplingParams, n: int) -> Counter:
    """(t1, t2) cells over n independent rows, speculative with k=2 (so t2 may come from a second draft)."""
    stream = SpeculativeStream(target, [PROMPT] * n, params, set(), draft=draft)
    rows: list[list[int]] = [[] for _ in range(n)]
    for tokens in stream:
        for row, token in enumerate(tokens):
            if token is not None:
                rows[row].append(token)
    vocab = target.config.vocab_size
    return Counter(r[0] * vocab + r[1] for r in rows)


SAMPLING = SamplingParams(max_new_tokens=3, temperature=1.0, top_k=12, repetition_penalty=1.3, seed=1234)


@pytest.fixture(scope="module")
def small_vocab():
    """Target and an often-wrong draft over 16 tokens, and the target's exact distribution of (t1, t2).

    One layer in float64: thousands of rows stay fast, and the exact distribution is not about rounding.
    """
    shape = dict(vocab_size=16, n_layer=1, n_embd=32, n_head=2, n_kv_head=1, std=0.4)
    target, other = tiny(4, **shape).double(), tiny(5, **shape).double()
    return target, other, exact_two_token_distribution(target, PROMPT, SAMPLING)


@pytest.mark.parametrize("kind", ["model", "ngram"])
def test_sampled_tokens_follow_the_targets_distribution(small_vocab, kind):
    target, other, exact = small_vocab
    draft = ModelDraft(other, k=2) if kind == "model" else NgramDraft(k=2)
    assert chi_square_ok(draw_pairs(target, draft, SAMPLING, 1500), exact, 1500)


@pytest.mark.parametrize("kind", ["model", "ngram"])
def test_a_wrong_acceptance_rule_fails_the_same_test(small_vocab, kind, monkeypatch):
    target, other, exact = small_vocab
    monkeypatch.setattr(speculative, "accept_probability", lambda p_x, q_x: 1.0)  # always accept
    draft = ModelDraft(other, k=2) if kind == "model" else NgramDraft(k=2)
    assert not chi_square_ok(draw_pairs(target, draft, SAMPLING, 400), exact, 400)


def test_rejection_resamples_from_the_residual():
    p = torch.tensor([[0.5, 0.3, 0.2, 0.0], [0.25, 0.25, 0.25, 0.25]])
    q = torch.tensor([[0.0, 0.0, 1.0, 0.0]])  # draft always says token 2; p(2) = 0.2
    g = torch.Generator().manual_seed(0)
    outcomes = Counter(verify_sampled(p, [2], q, g) for _ in range(4000))
    accepted = sum(c for (n, _), c in outcomes.items() if n == 1)
    assert abs(accepted / 4000 - 0.2) < 0.03
    residual = {tok: c for (n, tok), c in outcomes.items() if n == 0}  # rejected: p without token 2, renormalized
    assert set(residual) == {0, 1} and abs(residual[0] / sum(residual.values()) - 0.5 / 0.8) < 0.04


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-gemma3"])
def test_truncate_then_continue_equals_never_feeding_the_rejected_tokens(preset):
    model = tiny(6, preset)
    prompt, rejected, kept = PROMPT, [5, 6, 8, 2, 9], [40, 41, 42]
    with torch.no_grad():
        cache = KVCache(model.config, 1, 32)
        ids = torch.tensor([prompt])
        prefill(model, ids, torch.ones_like(ids, dtype=torch.bool), cache)
        model(torch.tensor([rejected]), cache=cache)
        cache.truncate(len(prompt))
        assert cache.length == len(prompt) and not cache.valid[:, len(prompt):].any()
        got = torch.cat([model(torch.tensor([[t]]), cache=cache)[:, -1] for t in kept])
        fresh = KVCache(model.config, 1, 32)
        prefill(model, ids, torch.ones_like(ids, dtype=torch.bool), fresh)
        want = model(torch.tensor([kept]), cache=fresh)[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_truncate_past_the_filled_slots_is_refused():
    cache = KVCache(Config.from_name("tiny-llama"), 1, 8)
    with pytest.raises(ValueError, match=r"must be in \[0, 0\]"):
        cache.truncate(3)


@pytest.mark.real_model
def test_generate_with_a_draft_equals_plain_greedy_on_the_real_model(smollm2_gguf):
    from lmforge.checkpoint.load import load
    from lmforge.generation.generate import generate

    model, tok = load(smollm2_gguf)
    text = "The river bends twice before the old mill, then runs straight to the sea."
    prompt = tok.apply_chat_template([{"role": "user", "content": f"Repeat this sentence exactly: {text}"}])
    params = SamplingParams(max_new_tokens=32, temperature=0)
    plain = generate(model, tok, [prompt, "Paris is"], params)
    spec = generate(model, tok, [prompt, "Paris is"], params, draft=NgramDraft())
    for a, b in zip(plain, spec):
        assert (a.text, a.token_ids, a.finish_reason) == (b.text, b.token_ids, b.finish_reason)
    assert plain[0].spec_stats is None and spec[0].spec_stats["accepted"] >= 4
