"""The serving engine: requests in, tokens out, one scheduled batch per `step()`.

Sequence -> BlockManager -> Scheduler -> ModelRunner -> Engine.step(), after vLLM and
nano-vllm, in small pieces. The engine is synchronous and single-threaded; the HTTP
server drives it from one background thread (`lmforge.serving.async_engine`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable
from typing import Sequence as Seq

import torch

from lmforge.generation.constrained import GrammarState, apply_mask, masks_in_background
from lmforge.generation.generate import Completion, TextAssembler
from lmforge.generation.sampling import SamplingParams, apply_repetition_penalty, sample
from lmforge.serving.block_manager import BlockManager
from lmforge.serving.model_runner import ModelRunner, PagedKVCache
from lmforge.serving.scheduler import Scheduler, SchedulerConfig
from lmforge.serving.sequence import Sequence, Status
from lmforge.serving.speculation import Speculation


@dataclass
class EngineConfig:
    """Engine sizes. The KV cache gets `kv_cache_mib` unless `num_blocks` is given."""

    block_size: int = 16
    kv_cache_mib: int = 512
    num_blocks: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    prefix_caching: bool = True


@dataclass
class StepOutput:
    """What one step produced for one sequence."""

    seq: Sequence
    token: int | None  # None when the step only advanced a prefill chunk or the token was a stop
    text: str = ""
    finished: bool = False
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)


class Engine:
    """Continuous-batching generation over a paged KV cache.

    `draft`: a factory of speculative drafts (lmforge.generation.drafts), one per sequence; each decode
    step then verifies the tokens its draft proposed (lmforge.serving.speculation).
    """

    def __init__(self, model, tokenizer, config: EngineConfig | None = None,
                 draft: Callable[[], object] | None = None) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.config = config = config or EngineConfig()
        weight = next(model.parameters())
        per_block = PagedKVCache.bytes_per_block(model.config, config.block_size, weight.dtype)
        num_blocks = config.num_blocks or max(1, config.kv_cache_mib * 2**20 // per_block)
        self.cache = PagedKVCache(model.config, num_blocks, config.block_size, weight.dtype, weight.device)
        self.blocks = BlockManager(num_blocks, config.block_size, config.prefix_caching)
        self.scheduler = Scheduler(SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens), self.blocks)
        self.runner = ModelRunner(model, self.cache)
        self.texts: dict[int, TextAssembler] = {}
        self.logprobs_wanted: dict[int, int] = {}
        self.speculation = Speculation(draft, model, tokenizer) if draft is not None else None

    @property
    def capacity_tokens(self) -> int:
        return len(self.blocks.blocks) * self.config.block_size

    def add_request(self, prompt: str | list[int], params: SamplingParams, logprobs: int = 0,
                    adapter: str | None = None) -> Sequence:
        """Queue a request; raises ValueError when it can never fit."""
        return self.add_parallel(prompt, [params], logprobs, adapter)[0]

    def add_parallel(self, prompt: str | list[int], params: Seq[SamplingParams], logprobs: int = 0,
                     adapter: str | None = None) -> list[Sequence]:
        """Queue one prompt sampled len(params) ways (OpenAI's n): one prefill, then forked sequences.

        The first sequence computes the prompt; the others share its KV blocks from then on
        (copy-on-write for the partly filled last block) and each samples with its own params.
        """
        if any(p.num_beams > 1 for p in params):
            raise ValueError("the engine samples; use lmforge.generation.beam for beam search")
        registry = self.runner.adapters
        if adapter is not None and (registry is None or adapter not in registry.names):
            loaded = sorted(registry.names) if registry is not None else []
            raise ValueError(f"adapter {adapter!r} is not loaded; loaded adapters: {loaded}")
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        limit = self.model.config.block_size
        if not ids:
            raise ValueError("the prompt is empty")
        if len(ids) >= limit:
            raise ValueError(f"the prompt has {len(ids)} tokens but the context is {limit}; shorten it")
        if any(not 0 <= t < self.model.config.vocab_size for t in ids):
            raise ValueError(f"prompt token ids must be in [0, {self.model.config.vocab_size})")
        most = min(max(p.max_new_tokens for p in params), limit - len(ids))
        if len(ids) + most > self.capacity_tokens:
            raise ValueError(f"prompt + max_tokens = {len(ids) + most} tokens exceeds the KV cache "
                             f"({self.capacity_tokens} tokens); raise kv_cache_mib or lower max_tokens")
        seqs = [self._sequence(ids, p, logprobs) for p in params]
        for seq in seqs:
            seq.adapter = adapter
        seqs[0].children = seqs[1:]
        self.scheduler.add(seqs[0])
        return seqs

    def _sequence(self, ids: list[int], params: SamplingParams, logprobs: int) -> Sequence:
        stop = set() if params.ignore_eos and params.constraint is None else set(self.tokenizer.stop_ids)
        max_new = min(params.max_new_tokens, self.model.config.block_size - len(ids))
        seq = Sequence(list(ids), params, eos_ids=frozenset(stop | set(params.stop_token_ids)), max_new=max_new)
        if params.constraint is not None:  # compiled here, so a grammar the engine rejects fails the request
            seq.grammar = GrammarState.start(params.constraint, self.tokenizer, sorted(seq.eos_ids))
        if self.speculation is not None and seq.grammar is None:  # constrained sequences decode without drafts
            self.speculation.attach(seq)
        self.texts[seq.seq_id] = TextAssembler(self.tokenizer, params.stop)
        self.logprobs_wanted[seq.seq_id] = logprobs
        return seq

    def abort(self, seq: Sequence) -> None:
        """Stop a request now (client went away) and free its blocks; unforked siblings go too."""
        for child in seq.children:
            self.abort(child)
        seq.children = []
        if not seq.is_finished:
            self.scheduler.finish(seq, "abort")
        self._forget(seq)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    def step(self) -> list[StepOutput]:
        """Schedule, run the model once, sample (or verify drafts), and report what changed."""
        if self.speculation is not None:
            self.speculation.propose(self.scheduler.running)
        batch = self.scheduler.schedule()
        if not batch:
            return []
        self.cache.copy_blocks(batch.copies)
        grammars = {s.seq_id: s.grammar for s in batch.seqs if s.grammar is not None}
        pending = masks_in_background(grammars, self.model.config.vocab_size) if grammars else None
        logits, sampling = self.runner.run(batch)  # the grammar masks fill on a worker thread meanwhile
        masks = pending.result() if pending is not None else {}
        for seq, n in zip(batch.seqs, batch.num_tokens):
            seq.num_computed += n - len(seq.draft_ids)  # drafts count once accepted
            self.blocks.register_full_blocks(seq)
        rows: list[tuple[Sequence, int]] = []  # who samples from which logits row, in output order
        verifying: list[tuple[Sequence, int]] = []  # sequences with drafts and their first logits row
        row = 0
        for seq in sampling:
            if seq.draft_ids:
                verifying.append((seq, row))
            else:
                rows.extend((child, row) for child in self._fork_children(seq))
                rows.append((seq, row))
            row += 1 + len(seq.draft_ids)
        tokens = self._sample(logits, rows, masks)
        now = time.perf_counter()
        outputs = [self._postprocess(seq, logits[i:i + 1], token, now) for (seq, i), token in zip(rows, tokens)]
        for seq, first in verifying:
            outputs.extend(self._accept(seq, logits[first:first + 1 + len(seq.draft_ids)], now))
        return outputs

    def _accept(self, seq: Sequence, logits: torch.Tensor, now: float) -> list[StepOutput]:
        """Verify `seq`'s drafts against its logits rows, emit the accepted run, drop the rejected keys."""
        run = self.speculation.verify(seq, logits)
        seq.draft_ids, seq.draft_probs = [], None
        outputs = []
        for j, token in enumerate(run):
            outputs.append(self._postprocess(seq, logits[j:j + 1], token, now))
            if outputs[-1].finished:
                return outputs
        seq.num_computed = seq.num_tokens - 1  # the last token and the accepted drafts are in the cache
        self.blocks.register_full_blocks(seq)
        self.blocks.trim(seq, seq.num_tokens)  # blocks that held only rejected drafts
        return outputs

    def _sample(self, logits: torch.Tensor, rows: list[tuple[Sequence, int]],
                masks: dict[int, torch.Tensor] | None = None) -> list[int]:
        """Next token of each (seq, logits row): plain greedy rows in one argmax, the rest one by one.

        The others are sampled in row order, so each seed (or the global generator) draws as
        it would alone.
        """
        plain = [_plain_greedy(seq.params) and seq.grammar is None for seq, _ in rows]
        tokens: list[int] = [0] * len(rows)
        if any(plain):
            picked = [j for j, p in enumerate(plain) if p]
            index = [rows[j][1] for j in picked]
            chosen = logits if index == list(range(len(logits))) else logits[torch.tensor(index)]
            best = chosen.argmax(-1).tolist()
            for j, token in zip(picked, best):
                tokens[j] = token
        for j, (seq, i) in enumerate(rows):
            if not plain[j]:
                row = logits[i:i + 1]
                if seq.grammar is not None:  # constrained decoding: tokens the grammar refuses get -inf
                    mask = (masks or {}).get(seq.seq_id)  # forked children compute theirs now
                    row = apply_mask(row, mask if mask is not None else seq.grammar.allowed_mask(row.shape[-1]))
                tokens[j] = int(sample(row, seq.params, _history(seq), seq.generator)[0])
        return tokens

    def _fork_children(self, seq: Sequence) -> list[Sequence]:
        """At a parent's first sample, its waiting siblings take over its blocks and start running."""
        children, seq.children = seq.children, []
        for child in children:
            self.blocks.fork(seq, child)
            child.status = Status.RUNNING
            self.scheduler.running.append(child)
        return children

    def _postprocess(self, seq: Sequence, logits: torch.Tensor, token: int, now: float) -> StepOutput:
        """Record the sampled `token` of `seq`, update its text, and finish it if it is done."""
        out = StepOutput(seq, token)
        if self.logprobs_wanted.get(seq.seq_id):
            out.logprob, out.top_logprobs = _logprobs(logits, _history(seq), seq.params, token,
                                                      self.logprobs_wanted[seq.seq_id])
        seq.first_token_at = seq.first_token_at or now
        seq.last_token_at = now
        text = self.texts[seq.seq_id]
        if token in seq.eos_ids:
            out.token, reason = None, "stop"
        else:
            seq.output_ids.append(token)
            if seq.grammar is not None:
                seq.grammar.advance(token)
            out.text = text.add(token)
            reason = "stop" if text.stopped else "length" if len(seq.output_ids) >= seq.max_new else None
        if reason:
            out.text += text.close()
            out.finished = True
            self.scheduler.finish(seq, "stop" if text.stopped else reason)
            self._forget(seq)
        return out

    def _forget(self, seq: Sequence) -> None:
        self.logprobs_wanted.pop(seq.seq_id, None)
        if seq.seq_id in self.texts:
            seq.text = self.texts.pop(seq.seq_id).text

    def generate(self, prompts: Seq[str | list[int]], params: SamplingParams | Seq[SamplingParams]
                 ) -> list[Completion]:
        """Run prompts to completion together (offline batch); one Completion each, in order."""
        params_list = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        seqs = [self.add_request(p, sp) for p, sp in zip(prompts, params_list)]
        while any(not s.is_finished for s in seqs):
            self.step()
        return [Completion(s.text, s.output_ids, s.finish_reason or "length", len(s.prompt_ids)) for s in seqs]


def _plain_greedy(params: SamplingParams) -> bool:
    """Greedy without a repetition penalty: the token is the row's argmax, batchable over rows."""
    return params.greedy and params.repetition_penalty == 1.0


def _history(seq: Sequence) -> torch.Tensor | None:
    """The (1, L) ids a repetition penalty looks at, or None when the penalty is off."""
    return torch.tensor([seq.all_ids]) if seq.params.repetition_penalty != 1.0 else None


def _logprobs(logits: torch.Tensor, history, params: SamplingParams, token: int, k: int
              ) -> tuple[float, list[tuple[int, float]]]:
    """Log-probability of `token` and the k best alternatives, under the model (after penalties)."""
    logits = apply_repetition_penalty(logits.float(), history, params.repetition_penalty) \
        if history is not None else logits.float()
    logp = logits.log_softmax(-1)[0]
    top = torch.topk(logp, k)
    return float(logp[token]), list(zip(top.indices.tolist(), top.values.tolist()))

