"""Sampling draws from the distribution the top-k / top-p / min-p formulas define."""

from __future__ import annotations

import math

import pytest
import torch

from lmforge.generation.sampling import SamplingParams, apply_repetition_penalty, sample, token_probabilities

LOGITS = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0]])


def reference_probs(logits: torch.Tensor, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) -> list[float]:
    """The textbook definition in plain Python: each filter sees the renormalised survivors of the last."""
    values = [v / temperature for v in logits[0].tolist()]
    exp = [math.exp(v) for v in values]
    order = sorted(range(len(values)), key=lambda i: -values[i])
    keep = set(order[:top_k]) if top_k else set(order)

    def prob(i: int) -> float:
        return exp[i] / sum(exp[j] for j in keep)

    cumulative, nucleus = 0.0, set()
    for i in [i for i in order if i in keep]:  # smallest prefix of the ranking whose mass reaches top_p
        if cumulative >= top_p:
            break
        nucleus.add(i)
        cumulative += prob(i)
    keep = nucleus
    if min_p:
        best = max(prob(i) for i in keep)
        keep = {i for i in keep if prob(i) >= min_p * best}
    return [prob(i) if i in keep else 0.0 for i in range(len(values))]


CASES = [dict(temperature=1.0), dict(temperature=0.7, top_k=3), dict(top_p=0.8), dict(temperature=1.3, top_p=0.6),
         dict(top_k=5, top_p=0.9), dict(min_p=0.2), dict(temperature=0.5, top_k=4, top_p=0.95, min_p=0.05)]


@pytest.mark.parametrize("case", CASES)
def test_distribution_equals_formula(case):
    got = token_probabilities(LOGITS, SamplingParams(**case))[0].tolist()
    assert got == pytest.approx(reference_probs(LOGITS, **case), abs=1e-6)


@pytest.mark.parametrize("case", CASES)
def test_sample_frequencies_pass_chi_square(case):
    params = SamplingParams(**case)
    expected = reference_probs(LOGITS, **case)
    n = 20000
    generator = torch.Generator().manual_seed(1234)
    draws = sample(LOGITS.expand(n, -1), params, generator=generator)
    counts = torch.bincount(draws, minlength=LOGITS.shape[1]).tolist()
    assert all(c == 0 for c, p in zip(counts, expected) if p == 0.0), "a filtered token was sampled"
    support = [(c, p * n) for c, p in zip(counts, expected) if p > 0]
    chi2 = sum((c - e) ** 2 / e for c, e in support)
    dof = len(support) - 1
    if dof:
        # 99.9th percentile of chi-square, Wilson-Hilferty approximation
        crit = dof * (1 - 2 / (9 * dof) + 3.09 * math.sqrt(2 / (9 * dof))) ** 3
        assert chi2 < crit, f"chi2={chi2:.1f} >= {crit:.1f} for {case}"


def test_greedy_is_argmax():
    assert sample(LOGITS, SamplingParams(temperature=0)).tolist() == [0]


def test_repetition_penalty_follows_ctrl():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    history = torch.tensor([[0, 1, -1]])  # -1 is padding, not token 0 or 3
    out = apply_repetition_penalty(logits, history, 2.0)
    assert out.tolist() == [[1.0, -2.0, 0.5, 3.0]]


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-2),
                                 dict(min_p=1.0), dict(max_new_tokens=0), dict(repetition_penalty=0),
                                 dict(stop=[""]), dict(num_beams=0)])
def test_invalid_values_name_the_rule(bad):
    with pytest.raises(ValueError, match="invalid SamplingParams"):
        SamplingParams(**bad)
