"""Exact speculative decoding: a draft guesses k tokens, the target checks them all in one forward.

Leviathan et al. 2023 ("Fast Inference from Transformers via Speculative Decoding", Algorithm 1)
and Chen et al. 2023 ("Accelerating Large Language Model Decoding with Speculative Sampling"):
accept draft token x with probability min(1, p(x)/q(x)); at the first rejection sample from
norm(max(0, p - q)) and stop; if all k pass, sample a bonus token from p after the last one. Each
emitted token then has exactly the target's distribution, whatever the draft proposed; greedy
decoding accepts while the draft equals the target's argmax, so the ids are plain greedy's ids.

`SpeculativeStream` has `TokenStream`'s interface, so `stream_batch` (and `stream`, `generate`)
take a `draft=` and run it unchanged. It decodes at batch size 1: several prompts run one after
another, each yield carrying the current row's token and None for the others.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterator, Sequence

import torch

from lmforge.generation.constrained import GrammarState, apply_mask
from lmforge.generation.drafts import (ADAPTIVE_START, MAX_DRAFT_TOKENS, Draft, check_compatible,
                                       check_draft_tokens)
from lmforge.generation.fused_decode import chunk_step
from lmforge.generation.steps import prefill
from lmforge.generation.kv_cache import KVCache, prefix_length
from lmforge.generation.sampling import SamplingParams, apply_repetition_penalty, token_probabilities


@dataclass
class SpecStats:
    """How well the draft guessed: drafted and accepted tokens, target forwards (prefill included)."""

    drafted: int = 0
    accepted: int = 0
    target_forwards: int = 0
    tokens: int = 0  # tokens emitted

    def add(self, other: SpecStats) -> SpecStats:
        return SpecStats(*(a + b for a, b in zip(asdict(self).values(), asdict(other).values())))

    def as_dict(self) -> dict[str, float]:
        """The counts plus acceptance rate and tokens per target forward (the speedup's upper bound)."""
        rate = self.accepted / self.drafted if self.drafted else 0.0
        per_forward = self.tokens / self.target_forwards if self.target_forwards else 0.0
        return {**asdict(self), "acceptance_rate": rate, "tokens_per_forward": per_forward}


class DraftLength:
    """Tokens to draft next: fixed, or adaptive (start at 4, +2 after a fully accepted step, else -1)."""

    def __init__(self, fixed: int | None) -> None:
        self.fixed = check_draft_tokens(fixed)
        self.k = fixed or ADAPTIVE_START

    def update(self, drafted: int, accepted: int) -> None:
        if self.fixed is None and drafted:  # a step with no guess says nothing about the draft
            self.k = min(MAX_DRAFT_TOKENS, self.k + 2) if accepted == drafted else max(1, self.k - 1)


def target_logits(logits: torch.Tensor, context: list[int], drafts: list[int], params: SamplingParams
                  ) -> torch.Tensor:
    """The logits `sample` would see at each verified position: repetition penalty with that position's history.

    Args:
        logits: (k+1, V) the target's logits after context, then after each of the k drafts.
    """
    logits = logits.float()
    if params.repetition_penalty == 1.0:
        return logits
    k = len(drafts)
    history = torch.full((k + 1, len(context) + k), -1, dtype=torch.long, device=logits.device)
    history[:, :len(context)] = torch.tensor(context, device=logits.device)
    for j in range(1, k + 1):  # row j has seen drafts[:j]
        history[j, len(context):len(context) + j] = torch.tensor(drafts[:j], device=logits.device)
    return apply_repetition_penalty(logits, history, params.repetition_penalty)


def verify_greedy(logits: torch.Tensor, drafts: list[int]) -> tuple[int, int]:
    """(accepted, next token): accept drafts while each equals the target's argmax, then emit its argmax."""
    best = logits.argmax(-1).tolist()
    accepted = 0
    while accepted < len(drafts) and drafts[accepted] == best[accepted]:
        accepted += 1
    return accepted, best[accepted]


def accept_probability(p_x: float, q_x: float) -> float:
    """Leviathan et al. 2023, Algorithm 1: keep a draft token x with probability min(1, p(x) / q(x))."""
    return min(1.0, p_x / q_x)


def verify_sampled(p: torch.Tensor, drafts: list[int], q: torch.Tensor | None,
                   generator: torch.Generator | None = None) -> tuple[int, int]:
    """(accepted, next token) by rejection sampling; the next token is a resample or the bonus.

    Args:
        p: (k+1, V) the target's distributions at the k draft positions and after the last draft.
        q: (k, V) the draft's distributions; None when the drafts were deterministic (q one-hot).
    """
    for j, x in enumerate(drafts):
        q_row = q[j] if q is not None else torch.nn.functional.one_hot(torch.tensor(x), p.shape[-1]).to(p)
        u = float(torch.rand((), generator=generator, device=p.device))
        if u < accept_probability(float(p[j, x]), float(q_row[x])):
            continue
        residual = (p[j] - q_row).clamp(min=0)  # norm(max(0, p - q)): where the target wants more than q gave
        if float(residual.sum()) <= 0:  # p == q up to rounding: a rejection then has probability ~0
            residual = p[j]
        return j, int(torch.multinomial(residual, 1, generator=generator))
    return len(drafts), int(torch.multinomial(p[-1], 1, generator=generator))


def draft_masks(state: GrammarState, drafts: list[int], vocab_size: int) -> tuple[torch.Tensor, list[int]]:
    """Constrained speculation: the allowed tokens (n+1, V) at each verified position and the drafts cut at the
    first one the grammar refuses (or a stop token), n = len(kept drafts). The matcher ends where it started."""
    masks, kept = [], []
    for token in drafts:
        masks.append(state.allowed_mask(vocab_size))
        if not masks[-1][token] or token in state.stop_ids or not state.advance(token):
            break
        kept.append(token)
    else:
        masks.append(state.allowed_mask(vocab_size))
    state.rollback(len(kept))
    return torch.stack(masks), kept


def _check_prompts(config, prompts: Sequence[Sequence[int]]) -> None:
    """The same boundary checks as TokenStream, with the same fixes named."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token; got an empty prompt")
    longest = max(len(p) for p in prompts)
    if longest >= config.block_size:
        raise ValueError(f"the prompt has {longest} tokens but the model's context is {config.block_size}; "
                         "shorten the prompt")
    if any(not 0 <= t < config.vocab_size for p in prompts for t in p):
        raise ValueError(f"prompt token ids must be in [0, {config.vocab_size})")


class SpeculativeStream:
    """TokenStream's interface (`__iter__`, `finish`, `reasons`, `done`) over speculative decoding.

    Rows run one after another at batch size 1; `stats` (all rows) and `row_stats` count drafted
    and accepted tokens and target forwards. `pad_id` is unused (batch 1 needs no padding); it keeps
    the signature TokenStream's.
    """

    def __init__(self, model, prompts: Sequence[Sequence[int]], params: SamplingParams, eos_ids: set[int],
                 pad_id: int = 0, draft: Draft | None = None, tokenizer=None) -> None:
        if draft is None:
            raise ValueError("SpeculativeStream needs a draft: NgramDraft() or ModelDraft(model, tokenizer)")
        if prefix_length(model):
            raise ValueError("speculative decoding does not run a model with a prefix-tuning adapter (its verify "
                             "steps do not see the prefix slots); decode without --speculative")
        _check_prompts(model.config, prompts)
        check_compatible(draft, model, tokenizer)
        self.fixed_k = check_draft_tokens(getattr(draft, "k", None))
        self.model, self.params, self.draft, self.tokenizer = model, params, draft, tokenizer
        if params.constraint is not None and tokenizer is None:
            raise ValueError("a constraint needs the tokenizer to build its token masks: pass tokenizer=")
        self.prompts = [list(p) for p in prompts]
        self.stop_ids = (set() if params.ignore_eos else set(eos_ids)) | set(params.stop_token_ids)
        if params.constraint is not None and tokenizer is not None:
            self.stop_ids |= tokenizer.stop_ids  # the grammar's end is a stop even with ignore_eos
        device = next(model.parameters()).device
        self.generator = torch.Generator(device=device).manual_seed(params.seed) if params.seed is not None else None
        self.done = [False] * len(prompts)
        self.reasons = ["length"] * len(prompts)
        self.row_stats = [SpecStats() for _ in prompts]

    def finish(self, row: int, reason: str = "stop") -> None:
        self.done[row], self.reasons[row] = True, reason

    @property
    def stats(self) -> dict[str, float]:
        """Counts over every row so far, with acceptance rate and tokens per target forward."""
        total = SpecStats()
        for row in self.row_stats:
            total = total.add(row)
        return total.as_dict()

    @torch.inference_mode()
    def __iter__(self) -> Iterator[list[int | None]]:
        """Yield one token per row per step: the current row's token, None for the others."""
        for row in range(len(self.prompts)):
            for token in self._decode_row(row):
                out: list[int | None] = [None] * len(self.prompts)
                out[row] = token
                yield out

    def _decode_row(self, row: int) -> Iterator[int]:
        """One prompt's tokens, a step's accepted run at a time; stops exactly where TokenStream would."""
        prompt, stats = self.prompts[row], self.row_stats[row]
        max_new = min(self.params.max_new_tokens, self.model.config.block_size - len(prompt))
        param = next(self.model.parameters())
        cache = KVCache(self.model.config, 1, len(prompt) + max_new, dtype=param.dtype, device=param.device)
        if len(prompt) > 1:  # all but the last prompt token: the first step feeds it with the first drafts
            ids = torch.tensor([prompt[:-1]], device=param.device)
            prefill(self.model, ids, torch.ones_like(ids, dtype=torch.bool), cache)
            stats.target_forwards += 1
        context, length = list(prompt), DraftLength(self.fixed_k)
        grammar = None if self.params.constraint is None else GrammarState.start(
            self.params.constraint, self.tokenizer, sorted(self.stop_ids))
        while True:
            run = self._step(context, cache, min(length.k, max_new - stats.tokens - 1), length, stats, grammar)
            for token in run:
                if token in self.stop_ids:
                    self.finish(row, "stop")
                    return
                context.append(token)
                stats.tokens += 1
                yield token
                if self.done[row] or stats.tokens >= max_new:  # finish() by the caller, or the length limit
                    return

    def _step(self, context: list[int], cache: KVCache, k: int, length: DraftLength, stats: SpecStats,
              grammar: GrammarState | None = None) -> list[int]:
        """Draft up to k tokens, verify them with one target forward, roll back the rest; the run to emit.
        A `grammar` masks the target at every position (drafts it refuses are cut before the forward) and
        advances by the emitted run only."""
        proposal = self.draft.propose(context, k, self.params, self.generator) if k > 0 else None
        drafts = proposal.tokens[:k] if proposal else []
        if grammar is not None:
            allowed, drafts = draft_masks(grammar, drafts, self.model.config.vocab_size)
        start = cache.length  # the cache holds context[:-1]; feed the last token and the drafts
        fed = torch.tensor([[context[-1], *drafts]], device=cache.positions.device)
        logits = chunk_step(self.model, fed[0], cache)  # the fused C++ step when it qualifies
        if logits is None:
            logits = self.model(fed, cache=cache)[0]
        logits = target_logits(logits, context, drafts, self.params)
        if grammar is not None:
            logits = apply_mask(logits, allowed)
        if self.params.greedy:
            accepted, token = verify_greedy(logits, drafts)
        else:
            q = proposal.probs[:len(drafts)] if proposal and proposal.probs is not None else None
            accepted, token = verify_sampled(token_probabilities(logits, self.params), drafts, q, self.generator)
        cache.truncate(start + 1 + accepted)  # keep the last token and the accepted drafts
        self.draft.rollback(len(context) + accepted)
        length.update(len(drafts), accepted)
        stats.drafted, stats.accepted = stats.drafted + len(drafts), stats.accepted + accepted
        stats.target_forwards += 1
        if grammar is not None:
            for emitted in [*drafts[:accepted], token]:
                grammar.advance(emitted)
        return [*drafts[:accepted], token]


@torch.inference_mode()
def speculative_ids(model, prompts: Sequence[Sequence[int]], params: SamplingParams, draft: Draft,
                    eos_ids: set[int] = frozenset(), tokenizer=None) -> tuple[list[list[int]], dict[str, float]]:
    """Token ids per prompt (EOS excluded) and the draft statistics: `generate_ids` with a draft."""
    stream = SpeculativeStream(model, prompts, params, set(eos_ids), draft=draft, tokenizer=tokenizer)
    outputs: list[list[int]] = [[] for _ in prompts]
    for tokens in stream:
        for row, token in enumerate(tokens):
            if token is not None:
                outputs[row].append(token)
    return outputs, stream.stats
