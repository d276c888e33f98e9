"""Speculative decoding in the serving engine: exact greedy ids, rollbacks that leak no block."""

from __future__ import annotations

import random

import pytest
import torch

from lmforge.config import Config
from lmforge.generation.drafts import ModelDraft, NgramDraft
from lmforge.generation.generate import generate_ids
from lmforge.generation.sampling import SamplingParams
from lmforge.model.transformer import build_model
from lmforge.serving.engine import Engine, EngineConfig
from tests.serving.test_engine import ByteTokenizer, _fused_step_rows, needs_kernels


def tiny(seed: int, **overrides):
    torch.manual_seed(seed)
    return build_model(Config.from_name("tiny-llama", **overrides)).eval()


def _prompts(n: int, seed: int) -> list[list[int]]:
    """Prompts that repeat themselves (so n-gram lookup finds matches) of different lengths."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        motif = [rng.randrange(1, 256) for _ in range(3 + i % 4)]
        out.append((motif * 6)[: 5 + 3 * i] + [rng.randrange(1, 256)])
    return out


def _check_blocks(engine: Engine) -> None:
    """Every block's reference count equals the number of block tables that hold it; free ones hold none."""
    held: dict[int, int] = {}
    for seq in engine.scheduler.running + list(engine.scheduler.waiting):
        for block_id in seq.block_table:
            held[block_id] = held.get(block_id, 0) + 1
    for block in engine.blocks.blocks:
        assert block.ref_count == held.get(block.block_id, 0), f"block {block.block_id}"
        assert (block.ref_count == 0) == (block.block_id in engine.blocks.free)


def _run_staggered(engine: Engine, prompts, max_new: list[int], params: SamplingParams) -> list[list[int]]:
    """Requests join two steps apart and leave when done; block invariants are checked after every step."""
    seqs, pending = [], list(zip(prompts, max_new))
    while pending or engine.has_unfinished():
        if pending:
            prompt, n = pending.pop(0)
            seqs.append(engine.add_request(prompt, SamplingParams(**{**params.__dict__, "max_new_tokens": n})))
        engine.step()
        if pending:
            engine.step()
        _check_blocks(engine)
    assert engine.blocks.num_free == len(engine.blocks.blocks)  # nothing leaked
    return [s.output_ids for s in seqs]


DRAFTS = {
    "ngram": lambda target: (lambda: NgramDraft()),
    "ngram-k3": lambda target: (lambda: NgramDraft(k=3)),
    "other-model": lambda target: (lambda: ModelDraft(tiny(9), k=4)),
    "itself": lambda target: (lambda: ModelDraft(target, k=4)),
}


@pytest.mark.parametrize("kind", sorted(DRAFTS))
def test_greedy_ids_equal_plain_decoding(kind):
    """For every draft kind, with requests joining and leaving and 4-slot blocks (rollbacks cross blocks),
    the engine's ids are each request's plain greedy ids, bit for bit."""
    target = tiny(0)
    prompts, max_new = _prompts(6, seed=1), [7, 20, 3, 16, 11, 24]
    params = SamplingParams(temperature=0, ignore_eos=True)
    engine = Engine(target, ByteTokenizer(), EngineConfig(block_size=4, num_blocks=128, prefix_caching=True),
                    draft=DRAFTS[kind](target))
    outputs = _run_staggered(engine, prompts, max_new, params)
    plain = [generate_ids(target, [p], SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True))[0]
             for p, n in zip(prompts, max_new)]
    assert outputs == plain
    stats = engine.speculation.stats
    assert stats.drafted > 0 and stats.tokens == stats.accepted + stats.target_forwards
    if kind == "itself":
        assert stats.accepted == stats.drafted  # the target never rejects its own greedy guesses


def test_rejections_free_their_blocks():
    """A draft that is always wrong: each step writes k keys, keeps one, and gives the extra blocks back."""
    target = tiny(0)
    engine = Engine(target, ByteTokenizer(), EngineConfig(block_size=2, num_blocks=64, prefix_caching=False),
                    draft=lambda: ModelDraft(tiny(5), k=8))
    seq = engine.add_request([1, 2, 3], SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
        _check_blocks(engine)
        if not seq.is_finished:
            assert len(seq.block_table) == -(-seq.num_tokens // 2)
    assert engine.speculation.stats.accepted < engine.speculation.stats.drafted
    assert engine.blocks.num_free == 64


def test_a_draft_with_another_vocabulary_is_refused():
    with pytest.raises(ValueError, match="vocabulary of 300 tokens"):
        Engine(tiny(0), ByteTokenizer(), EngineConfig(num_blocks=16), draft=lambda: ModelDraft(tiny(1, vocab_size=300)))


@needs_kernels
def test_verify_steps_run_in_the_fused_paged_step(monkeypatch):
    """A step of decodes and draft verifications runs every token as a row of the C++ step (1 + k rows for
    one sequence), and its ids stay plain greedy's."""
    rows = _fused_step_rows(monkeypatch)
    target = tiny(0)
    engine = Engine(target, ByteTokenizer(), EngineConfig(block_size=4, num_blocks=64), draft=lambda: ModelDraft(target, k=5))
    seq = engine.add_request([7, 8, 9, 10], SamplingParams(temperature=0, max_new_tokens=14, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
    assert 6 in rows  # the last token and 5 drafts, verified in one fused call
    assert seq.output_ids == generate_ids(target, [[7, 8, 9, 10]], SamplingParams(max_new_tokens=14, temperature=0,
                                                                                 ignore_eos=True))[0]
