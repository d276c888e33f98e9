"""Drafts for speculative decoding: cheap guesses of the next k tokens, which the target then verifies.

`NgramDraft` looks its guess up in the text so far (prompt lookup decoding, Saxena 2023): no model,
free, and right whenever the output copies the prompt (rewriting, editing, code, quoting).
`ModelDraft` samples its guess from a smaller or cheaper model with the same tokenizer, such as the
int4 copy of the target (Leviathan et al. 2023, "Fast Inference from Transformers via Speculative
Decoding"). Both sit behind `Draft`: `propose` plus a `rollback` hook for a draft's own KV cache.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Protocol, Sequence

import torch

from lmforge.generation.fused_decode import chunk_step
from lmforge.generation.kv_cache import KVCache
from lmforge.generation.sampling import SamplingParams, apply_repetition_penalty, token_probabilities

MAX_DRAFT_TOKENS = 16  # the verify forward grows with k; past ~16 a miss wastes more than a hit saves
ADAPTIVE_START = 4  # adaptive k: start here, +2 after a fully accepted step, -1 otherwise


@dataclass
class Proposal:
    """Draft tokens for the next positions and, for a sampled draft, the distributions they came from.

    Args:
        tokens: the proposed ids, in order (may be empty: no guess, the target takes a plain step).
        probs: (len(tokens), V) the draft's distribution q at each proposed position; None when each
            token was chosen deterministically (q is one-hot: n-gram lookup, or a greedy draft).
    """

    tokens: list[int]
    probs: torch.Tensor | None = None


class Draft(Protocol):
    """Proposes tokens for the target to verify; exactness never depends on how good they are."""

    name: str
    k: int | None  # tokens per step; None = adaptive
    vocab_size: int | None  # None: proposes ids taken from the context, any vocabulary works
    tokenizer: object | None  # compared with the target's tokenizer when both are known

    def propose(self, context: Sequence[int], k: int, params: SamplingParams,
                generator: torch.Generator | None = None) -> Proposal:
        """Up to k tokens that may follow `context` (prompt + output so far)."""
        ...

    def rollback(self, length: int) -> None:
        """Only the first `length` context tokens were kept: drop any state past them."""
        ...


def check_draft_tokens(k: int | None) -> int | None:
    """`k` itself, or a ValueError naming the accepted range (None = adaptive)."""
    if k is not None and not (isinstance(k, int) and 1 <= k <= MAX_DRAFT_TOKENS):
        raise ValueError(f"draft tokens k={k!r} must be an integer in 1..{MAX_DRAFT_TOKENS}, "
                         "or None for adaptive (start at 4, grow after full acceptance)")
    return k


class NgramDraft:
    """Prompt lookup decoding: find the last n-gram earlier in prompt+output, propose what followed it.

    `min_ngram` is 2 by default: on SmolLM2-135M the token after a single matching token was right
    12-13% of the time (3-gram matches: 75-100%), below the ~18% at which one more verified token pays
    for itself on the CPU, and skipping those guesses took open chat from 0.92x to 1.00x plain.
    """

    vocab_size = None
    tokenizer = None

    def __init__(self, k: int | None = None, max_ngram: int = 3, min_ngram: int = 2) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"n-gram sizes need 1 <= min_ngram <= max_ngram; got {min_ngram}, {max_ngram}")
        self.k, self.max_ngram, self.min_ngram = check_draft_tokens(k), max_ngram, min_ngram
        self.name = f"ngram({min_ngram}..{max_ngram})"

    def propose(self, context: Sequence[int], k: int, params: SamplingParams,
                generator: torch.Generator | None = None) -> Proposal:
        """The tokens after the latest earlier match of the longest matching tail n-gram; q is one-hot."""
        ids = torch.as_tensor(list(context), dtype=torch.long)
        for n in range(min(self.max_ngram, len(ids) - 1), self.min_ngram - 1, -1):
            windows = ids[:-1].unfold(0, n, 1)  # every earlier n-gram, (L-n, n); the tail itself excluded
            hits = (windows == ids[-n:]).all(dim=1).nonzero()
            if hits.numel():
                start = int(hits[-1]) + n
                return Proposal(ids[start:start + k].tolist())
        return Proposal([])

    def rollback(self, length: int) -> None:
        """Nothing to roll back: the lookup reads the context afresh each step."""


class ModelDraft:
    """A smaller lmforge Transformer with the target's tokenizer, sampling from its own warped distribution.

    It keeps a static KV cache of the tokens it has seen; each `propose` keeps the longest prefix
    shared with the new context (so rejected guesses fall away, and a chat reuses earlier turns)
    and feeds the rest.
    """

    def __init__(self, model, tokenizer=None, k: int | None = None, name: str | None = None) -> None:
        self.model, self.tokenizer, self.k = model, tokenizer, check_draft_tokens(k)
        self.vocab_size = model.config.vocab_size
        self.name = name or f"model {model.config.name}"
        self.cache: KVCache | None = None
        self.seen: list[int] = []  # the tokens whose keys/values fill the cache, in slot order

    @torch.inference_mode()
    def propose(self, context: Sequence[int], k: int, params: SamplingParams,
                generator: torch.Generator | None = None) -> Proposal:
        """Sample k tokens one by one (argmax when greedy), each with its q row unless greedy."""
        k = min(k, self.model.config.block_size - len(context))
        if k <= 0:
            return Proposal([])
        logits = self._sync(list(context), len(context) + k)
        tokens, rows = [], []
        for i in range(k):
            if i:
                logits = self._feed([tokens[-1]])
            if params.repetition_penalty != 1.0:
                history = torch.tensor([list(context) + tokens], device=logits.device)
                logits = apply_repetition_penalty(logits.float(), history, params.repetition_penalty)
            if params.greedy:
                tokens.append(int(logits.argmax(-1)))
                continue
            q = token_probabilities(logits, params)[0]  # (V,)
            tokens.append(int(torch.multinomial(q, 1, generator=generator)))
            rows.append(q)
        return Proposal(tokens, torch.stack(rows) if rows else None)

    @torch.inference_mode()  # the cache was made in inference mode, so only there can it change
    def rollback(self, length: int) -> None:
        """Drop cached tokens past `length` (rejected guesses), keeping the cache and `seen` in step."""
        if self.cache is not None and len(self.seen) > length:
            self.cache.truncate(length)
            del self.seen[length:]

    def _sync(self, context: list[int], need: int) -> torch.Tensor:
        """Make the cache hold `context` (reusing the shared prefix); return logits (1, V) after it."""
        shared = 0
        for a, b in zip(self.seen, context[:-1]):  # keep at least the last token to feed
            if a != b:
                break
            shared += 1
        # a new cache also when a window layer's ring cannot roll back to the shared prefix (kv_cache.SPARE_SLOTS)
        if self.cache is None or self.cache.max_len < need or not self.cache.can_truncate(shared):
            device = next(self.model.parameters()).device
            size = min(self.model.config.block_size, max(2 * need, 256))  # room to grow before reallocating
            dtype = next(self.model.parameters()).dtype
            self.cache, self.seen, shared = KVCache(self.model.config, 1, size, dtype=dtype, device=device), [], 0
        self.rollback(shared)
        return self._feed(context[shared:])

    def _feed(self, ids: list[int]) -> torch.Tensor:
        """Run `ids` through the draft after its cached tokens; logits (1, V) after the last one."""
        tokens = torch.tensor(ids, device=self.cache.positions.device)
        logits = chunk_step(self.model, tokens, self.cache)  # the fused C++ step when it qualifies
        if logits is None:
            logits = self.model(tokens[None], cache=self.cache, last_only=True)[0]
        self.seen.extend(ids)
        return logits[-1:]


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of the id -> token table: two tokenizers agree on every id exactly when these match."""
    digest = hashlib.sha256()
    for token_id in range(tokenizer.vocab_size):
        digest.update(f"{token_id}\t{tokenizer.id_to_token(token_id)}\n".encode())
    return digest.hexdigest()


def check_compatible(draft: Draft, model, tokenizer=None) -> None:
    """Refuse a draft whose vocabulary or tokenizer differs from the target's (its ids would mean other text)."""
    vocab = getattr(draft, "vocab_size", None)
    target = f"target model {model.config.name}"
    if vocab is not None and vocab != model.config.vocab_size:
        raise ValueError(f"draft {draft.name} has a vocabulary of {vocab} tokens but the {target} has "
                         f"{model.config.vocab_size}; a draft model must use the target's tokenizer")
    theirs = getattr(draft, "tokenizer", None)
    if theirs is None or tokenizer is None or theirs is tokenizer:
        return
    a, b = tokenizer_fingerprint(theirs), tokenizer_fingerprint(tokenizer)
    if a != b:
        raise ValueError(f"draft {draft.name} has tokenizer {a[:12]} ({theirs.vocab_size} tokens) but the "
                         f"{target} has tokenizer {b[:12]} ({tokenizer.vocab_size} tokens); a draft model "
                         "must use the target's tokenizer (the same id -> token table)")


def parse_speculative(spec: str) -> tuple[str, str | None]:
    """("ngram", None) or ("model", PATH) from a --speculative value; a ValueError names the accepted forms."""
    kind, _, path = spec.partition(":")
    if spec == "ngram":
        return "ngram", None
    if kind == "model" and path:
        return "model", path
    raise ValueError(f"--speculative {spec!r} is not understood; use 'ngram' (prompt lookup, no model) or "
                     "'model:PATH' (a draft model name, .gguf file or folder with the target's tokenizer)")
