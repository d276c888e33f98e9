"""Autoregressive generation with a KV cache: batched prompts, stop strings, streaming text.

Layers, smallest first: `prefill` and `decode_one_token` (steps.py) run the model; `TokenStream` walks
a batch through sampling steps; `stream_batch` turns tokens into text deltas with stop
strings; `stream` and `generate` are the two calls most users want.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from lmforge.generation.constrained import ConstrainedBatch
from lmforge.generation.drafts import Draft
from lmforge.generation.kv_cache import prefix_length
from lmforge.generation.sampling import SamplingParams, sample
from lmforge.generation.state_cache import make_cache
from lmforge.generation.steps import decode_one_token, left_pad, prefill


@dataclass
class Completion:
    """One finished output: text, its token ids (EOS excluded), why it stopped, token counts."""

    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = "length"  # "stop" (EOS or stop string) | "length"
    prompt_tokens: int = 0
    spec_stats: dict | None = None  # speculative decoding: drafted/accepted tokens, target forwards


class TokenStream:
    """Steps a batch of prompts through sampling; rows finish on EOS, length, or `finish()`."""

    @torch.inference_mode()  # the fused decode step (and no autograd graph) whoever iterates the stream
    def __init__(self, model, prompts: Sequence[Sequence[int]], params: SamplingParams, eos_ids: set[int],
                 pad_id: int = 0, tokenizer=None) -> None:
        config = model.config
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token; got an empty prompt")
        longest = max(len(p) for p in prompts)
        prefix = prefix_length(model)  # prefix tuning's virtual tokens take the cache's first slots
        if longest + prefix >= config.block_size:
            raise ValueError(f"the prompt has {longest} tokens (+{prefix} prefix) but the model's context is "
                             f"{config.block_size}; shorten the prompt")
        if any(not 0 <= t < config.vocab_size for p in prompts for t in p):
            raise ValueError(f"prompt token ids must be in [0, {config.vocab_size})")
        self.model, self.params = model, params
        self.max_new = min(params.max_new_tokens, config.block_size - longest - prefix)
        self.stop_ids = set() if params.ignore_eos else set(eos_ids)
        self.stop_ids |= set(params.stop_token_ids)
        dtype = next(model.parameters()).dtype
        device = next(model.parameters()).device
        # a KVCache, or per-layer recurrent state for Mamba and hybrids (generation/state_cache.py)
        self.cache = make_cache(config, len(prompts), prefix + longest + self.max_new, dtype=dtype, device=device)
        ids, valid = left_pad(prompts, pad_id)
        self.aligned = bool(valid.all())  # no padding: positions are cache slots (decode_one_token)
        self.history = ids.masked_fill(~valid, -1).to(device) if params.repetition_penalty != 1.0 else None
        self.logits, self.pos = prefill(model, ids.to(device), valid.to(device), self.cache)
        self.generator = torch.Generator(device=device).manual_seed(params.seed) if params.seed is not None else None
        # constrained decoding: one grammar matcher per row masks the logits (the tokenizer maps ids to text)
        self.grammar = ConstrainedBatch.start(params.constraint, tokenizer, len(prompts), config.vocab_size)
        if self.grammar is not None:
            self.stop_ids |= tokenizer.stop_ids  # the grammar's end is a stop even with ignore_eos
        self.done = [False] * len(prompts)
        self.reasons = ["length"] * len(prompts)
        self.steps = 0

    def finish(self, row: int, reason: str = "stop") -> None:
        self.done[row], self.reasons[row] = True, reason

    @torch.inference_mode()
    def __iter__(self) -> Iterator[list[int | None]]:
        """Yield one token per row per step (None for rows already finished)."""
        while self.steps < self.max_new and not all(self.done):
            logits = self.grammar.apply(self.logits) if self.grammar is not None else self.logits
            tokens = sample(logits, self.params, self.history, self.generator)
            out: list[int | None] = []
            for row, token in enumerate(tokens.tolist()):
                if self.done[row]:
                    out.append(None)
                elif token in self.stop_ids:
                    self.finish(row, "stop")
                    out.append(None)
                else:
                    out.append(token)
            self.steps += 1
            if self.grammar is not None:
                self.grammar.advance(out)
            yield out
            if all(self.done) or self.steps >= self.max_new:
                return
            if self.history is not None:
                self.history = torch.cat([self.history, tokens[:, None]], dim=1)
            if self.grammar is not None:
                self.grammar.prefetch()  # the next masks are filled on a worker thread during the forward
            self.logits = decode_one_token(self.model, tokens, self.pos, self.cache, self.aligned)
            self.pos = self.pos + 1


@torch.inference_mode()
def generate_ids(model, prompts: Sequence[Sequence[int]], params: SamplingParams, eos_ids: set[int] = frozenset(),
                 tokenizer=None) -> list[list[int]]:
    """Token ids generated for each prompt (EOS not included; the tokenizer is needed only by a constraint)."""
    stream = TokenStream(model, prompts, params, set(eos_ids), tokenizer=tokenizer)
    outputs: list[list[int]] = [[] for _ in prompts]
    for tokens in stream:
        for row, token in enumerate(tokens):
            if token is not None:
                outputs[row].append(token)
    return outputs


class TextAssembler:
    """One row's text: decoded deltas held back while they could still start a stop string."""

    def __init__(self, tokenizer, stops: list[str]) -> None:
        self.decoder = tokenizer.stream_decoder(skip_special_tokens=True)
        self.stops, self.hold = stops, max((len(s) for s in stops), default=1) - 1
        self.text, self.emitted, self.ids, self.stopped = "", 0, [], False

    def add(self, token: int) -> str:
        """Append a token; return the text that is now safe to emit (see `stopped`)."""
        self.ids.append(token)
        self.text += self.decoder.add(token)
        if self._cut_at_stop():
            return self._emit(len(self.text))
        return self._emit(len(self.text) - self.hold)

    def close(self) -> str:
        """The rest of the text once the row has ended."""
        if not self.stopped:
            self.text += self.decoder.flush()
            self._cut_at_stop()
        return self._emit(len(self.text))

    def _cut_at_stop(self) -> bool:
        search_from = max(0, self.emitted - self.hold)
        hits = [i for i in (self.text.find(s, search_from) for s in self.stops) if i >= 0]
        if hits:
            self.text, self.stopped = self.text[:min(hits)], True
        return self.stopped

    def _emit(self, upto: int) -> str:
        upto = max(upto, self.emitted)
        delta, self.emitted = self.text[self.emitted:upto], upto
        return delta


def encode_prompts(tokenizer, prompts: Sequence[str] | Sequence[Sequence[int]]) -> list[list[int]]:
    """Strings are encoded with the model's special tokens (BOS); id lists pass through."""
    return [tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]


@torch.inference_mode()
def stream_batch(model, tokenizer, prompts: Sequence[str] | Sequence[Sequence[int]], params: SamplingParams,
                 completions: list[Completion] | None = None, draft: Draft | None = None
                 ) -> Iterator[tuple[int, str]]:
    """Yield (row, text delta) as tokens arrive; fill `completions` (if given) when done.

    With a `draft` (lmforge.generation.drafts) decoding is speculative and exact: the same
    distribution (greedy: the same ids), prompts one after another, each Completion's `spec_stats` set.
    """
    ids = encode_prompts(tokenizer, prompts)
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    if draft is None:
        stream = TokenStream(model, ids, params, tokenizer.stop_ids, pad_id=pad, tokenizer=tokenizer)
    else:
        from lmforge.generation.speculative import SpeculativeStream  # it builds on TokenStream's steps

        stream = SpeculativeStream(model, ids, params, tokenizer.stop_ids, pad, draft=draft, tokenizer=tokenizer)
    rows = [TextAssembler(tokenizer, params.stop) for _ in ids]
    for tokens in stream:
        for row, token in enumerate(tokens):
            if token is None:
                continue
            delta = rows[row].add(token)
            if rows[row].stopped:
                stream.finish(row, "stop")
            if delta:
                yield row, delta
    for row, text_row in enumerate(rows):
        tail = text_row.close()
        if text_row.stopped:
            stream.reasons[row] = "stop"
        if tail:
            yield row, tail
        if completions is not None:
            spec = stream.row_stats[row].as_dict() if draft is not None else None
            completions.append(Completion(text_row.text, text_row.ids, stream.reasons[row], len(ids[row]), spec))


def stream(model, tokenizer, prompt: str | Sequence[int], params: SamplingParams | None = None,
           draft: Draft | None = None) -> Iterator[str]:
    """Text deltas for one prompt, as they are generated (speculatively with a `draft`)."""
    for _, delta in stream_batch(model, tokenizer, [prompt], params or SamplingParams(), draft=draft):
        yield delta


def generate(model, tokenizer, prompts: str | Sequence[str], params: SamplingParams | None = None,
             draft: Draft | None = None) -> list[Completion]:
    """Complete one or many prompts (batched, left-padded; one by one with a speculative `draft`)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    completions: list[Completion] = []
    for _ in stream_batch(model, tokenizer, prompts, params or SamplingParams(), completions, draft=draft):
        pass
    return completions
