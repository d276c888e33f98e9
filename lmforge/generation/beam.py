"""Beam search: keep the `num_beams` best partial outputs by summed log-probability.

Finished hypotheses are scored sum_logprob / generated_len ** length_penalty. Stopping
follows Hugging Face's rules, so results match `transformers` beam search:
early_stopping=True stops once num_beams hypotheses are done; False stops when the best
running beam, at its current length, cannot beat the worst finished one; "never" assumes
the best running beam could still grow to max length when length_penalty > 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmforge.generation.constrained import GrammarState, apply_mask
from lmforge.generation.kv_cache import prefix_length
from lmforge.generation.steps import decode_one_token, prefill
from lmforge.generation.state_cache import make_cache
from lmforge.generation.sampling import SamplingParams

NEG = -1.0e9  # stands in for -inf without producing NaN in sums


@dataclass
class Hypothesis:
    tokens: list[int]  # generated tokens, EOS included when it ended the beam
    score: float  # length-normalised log-probability


def _finished_better(finished: list[Hypothesis], candidate: Hypothesis, num_beams: int) -> list[Hypothesis]:
    return sorted(finished + [candidate], key=lambda h: -h.score)[:num_beams]


@torch.inference_mode()
def beam_search(model, prompt: list[int], params: SamplingParams, eos_ids: set[int], tokenizer=None
                ) -> list[Hypothesis]:
    """The best hypotheses for one prompt, best first.

    Args:
        prompt: token ids. params: num_beams, max_new_tokens, length_penalty, early_stopping, constraint.
        eos_ids: tokens that end a hypothesis. tokenizer: needed only by a constraint.
    """
    k = params.num_beams
    prefix = prefix_length(model)  # prefix tuning's virtual tokens take the cache's first slots
    max_new = min(params.max_new_tokens, model.config.block_size - len(prompt) - prefix)
    if max_new < 1 or not prompt:
        raise ValueError(f"prompt of {len(prompt)} tokens leaves no room in the {model.config.block_size}-token "
                         "context; shorten it")
    weight = next(model.parameters())
    cache = make_cache(model.config, k, prefix + len(prompt) + max_new, dtype=weight.dtype, device=weight.device)
    ids = torch.tensor([prompt] * k, device=weight.device)
    logits, pos = prefill(model, ids, torch.ones_like(ids, dtype=torch.bool), cache)

    def advance(parents: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        nonlocal pos
        cache.reorder(parents)
        out = decode_one_token(model, tokens, pos, cache, aligned=True)  # beams are not padded
        pos = pos + 1
        return out

    grammar = None
    if params.constraint is not None:
        if tokenizer is None:
            raise ValueError("a constraint needs the tokenizer to build its token masks: pass tokenizer=")
        grammar = [GrammarState.start(params.constraint, tokenizer, sorted(eos_ids)) for _ in range(k)]
    return search_beams(logits, advance, params, eos_ids, max_new, grammar)


def search_beams(logits: torch.Tensor, advance, params: SamplingParams, eos_ids: set[int],
                 max_new: int, grammar: list[GrammarState] | None = None) -> list[Hypothesis]:
    """The beam loop every model family shares: from the first step's logits (num_beams, V), keep the
    best beams; `advance(parents, tokens)` reorders the caller's cache to the surviving beams' parents,
    feeds their new tokens and returns the next logits (num_beams, V). `grammar`: one matcher per beam
    (constrained decoding), forked to follow the surviving beams; refused tokens score NEG."""
    k, lp = params.num_beams, params.length_penalty
    running_scores = torch.full((k,), NEG, device=logits.device)
    running_scores[0] = 0.0  # all beams start identical: only one may expand at first
    running: list[list[int]] = [[] for _ in range(k)]
    finished: list[Hypothesis] = []
    eos = torch.tensor(sorted(eos_ids), dtype=torch.long, device=logits.device)
    keep = max(2, 1 + len(eos_ids)) * k  # enough candidates that k survive even if many hit EOS
    improvable = True
    for step in range(max_new):
        if grammar is not None:
            allowed = torch.stack([g.allowed_mask(logits.shape[-1]) for g in grammar])
            logits = apply_mask(logits.float(), allowed, NEG)
        scores = (logits.float().log_softmax(-1) + running_scores[:, None]).reshape(-1)  # (k * V,)
        top_scores, top_index = torch.topk(scores, keep)
        beam_of, token_of = top_index // logits.shape[-1], top_index % logits.shape[-1]
        ends = torch.isin(token_of, eos) | (step + 1 == max_new)
        full = len(finished) == k and params.early_stopping is True
        for rank in range(k):  # only the top k candidates may finish (Hugging Face's rule)
            if ends[rank] and improvable and not full and float(top_scores[rank]) > NEG / 2:  # not refused
                tokens = running[beam_of[rank]] + [int(token_of[rank])]
                hyp = Hypothesis(tokens, float(top_scores[rank]) / (step + 1) ** lp)
                finished = _finished_better(finished, hyp, k)
        alive = torch.topk(top_scores + ends.float() * NEG, k).indices  # best k that did not end
        running_scores = top_scores[alive]
        parents = beam_of[alive]
        running = [running[p] + [int(t)] for p, t in zip(parents.tolist(), token_of[alive].tolist())]
        if grammar is not None:
            grammar = [grammar[p].fork() for p in parents.tolist()]
            for g, t in zip(grammar, token_of[alive].tolist()):
                g.advance(t)  # a refused token leaves the beam dead: all its next tokens score NEG
        improvable = improvable and _can_improve(finished, float(running_scores[0]), step + 1, max_new, params)
        all_done = len(finished) == k and params.early_stopping is True
        if not improvable or all_done or bool(ends.all()):
            break
        logits = advance(parents, token_of[alive])
    return finished


def _can_improve(finished: list[Hypothesis], best_running: float, length: int, max_new: int,
                 params: SamplingParams) -> bool:
    """Could the best running beam still beat the worst of num_beams finished hypotheses?"""
    if len(finished) < params.num_beams:
        return True
    lp = params.length_penalty
    best_length = max_new if params.early_stopping == "never" and lp > 0 else length
    return best_running / best_length ** lp > min(h.score for h in finished)


def beam_generate(model, prompt: list[int], params: SamplingParams, eos_ids: set[int] = frozenset(),
                  tokenizer=None) -> list[int]:
    """Token ids of the best beam (EOS stripped; the tokenizer is needed only by a constraint)."""
    best = beam_search(model, prompt, params, set(eos_ids), tokenizer)[0].tokens
    return best[:-1] if best and best[-1] in eos_ids else best
