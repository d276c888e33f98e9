"""The engine gives each request exactly what `generate` gives it alone, whatever else runs."""

from __future__ import annotations

import random

import pytest
import torch

from lmforge.config import Config
from lmforge.generation import fused_decode
from lmforge.generation.generate import generate_ids
from lmforge.generation.sampling import SamplingParams
from lmforge.kernels import gemv
from lmforge.model.transformer import build_model, init_weights
from lmforge.quantization.quantize import QuantConfig, quantize_model
from lmforge.serving.engine import Engine, EngineConfig

needs_kernels = pytest.mark.skipif(gemv.extension() is None, reason="lmforge's CPU kernels could not be built here")
# int4 products may round their inputs to int8 (VNNI), so the fused and module paths agree to ~1e-2
# there (as in tests/generation/test_fused_decode.py)
INT4_TOLERANCE = dict(rtol=0.02, atol=0.02)


class ByteTokenizer:
    """A real, trivial tokenizer (ids are bytes) so engine tests need no model files."""

    stop_ids: set[int] = set()
    pad_id = 0

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(text.encode())

    def stream_decoder(self, skip_special_tokens: bool = True):
        return _ByteDecoder()


class _ByteDecoder:
    def __init__(self):
        self.buf = b""

    def add(self, token: int) -> str:
        self.buf += bytes([token])
        try:
            text, self.buf = self.buf.decode(), b""
            return text
        except UnicodeDecodeError:
            return ""

    def flush(self) -> str:
        text, self.buf = self.buf.decode(errors="replace"), b""
        return text


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-gemma3"])
def model(request):
    torch.manual_seed(0)
    return build_model(Config.from_name(request.param)).eval()


def _prompts(n: int, seed: int, shared_prefix: list[int] | None = None) -> list[list[int]]:
    rng = random.Random(seed)
    prefix = shared_prefix or []
    return [prefix + [rng.randrange(1, 256) for _ in range(rng.randrange(3, 40))] for _ in range(n)]


def _alone(model, prompts, max_new):
    params = SamplingParams(max_new_tokens=max_new, temperature=0)
    return [generate_ids(model, [p], params)[0] for p in prompts]


def _run_with_arrivals(engine: Engine, prompts, max_new, arrive_every=2):
    """Add one request every `arrive_every` steps while the others run; collect output ids."""
    params = SamplingParams(max_new_tokens=max_new, temperature=0)
    pending, seqs, steps = list(prompts), [], 0
    while pending or engine.has_unfinished():
        if pending and steps % arrive_every == 0:
            seqs.append(engine.add_request(pending.pop(0), params))
        engine.step()
        steps += 1
    return [s.output_ids for s in seqs]


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_engine_equals_generate_with_arrivals(model, prefix_caching):
    shared = list(range(1, 40))  # 39 shared tokens: two full 16-token blocks reused
    prompts = _prompts(6, seed=1, shared_prefix=shared)
    engine = Engine(model, ByteTokenizer(), EngineConfig(block_size=16, num_blocks=256,
                                                          prefix_caching=prefix_caching))
    assert _run_with_arrivals(engine, prompts, 20) == _alone(model, prompts, 20)
    if prefix_caching:
        assert engine.blocks.prefix_hits >= 5 * 32  # every later request reused the shared blocks
    assert engine.blocks.num_used == 0  # finished sequences hold nothing (cached blocks stay findable)


def test_mixed_sampling_in_one_batch_equals_generate(model):
    """Batched greedy rows next to penalised and seeded sampled rows: each as `generate` alone."""
    prompts = _prompts(5, seed=4)
    params = [SamplingParams(max_new_tokens=12, temperature=0),
              SamplingParams(max_new_tokens=12, temperature=0, repetition_penalty=1.5),
              SamplingParams(max_new_tokens=12, temperature=0.8, top_k=20, seed=1),
              SamplingParams(max_new_tokens=12, temperature=0),
              SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.9, repetition_penalty=1.2, seed=2)]
    engine = Engine(model, ByteTokenizer(), EngineConfig(block_size=8, num_blocks=128))
    seqs = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    while engine.has_unfinished():
        engine.step()
    assert [s.output_ids for s in seqs] == [generate_ids(model, [p], sp)[0] for p, sp in zip(prompts, params)]


def test_chunked_prefill_and_tight_budget(model):
    prompts = _prompts(4, seed=2)
    prompts[0] = list(range(1, 120))  # longer than the step budget: prefilled in chunks
    engine = Engine(model, ByteTokenizer(), EngineConfig(block_size=8, num_blocks=256, max_num_batched_tokens=24,
                                                          max_num_seqs=3))
    assert _run_with_arrivals(engine, prompts, 12, arrive_every=1) == _alone(model, prompts, 12)


def test_preemption_recomputes_and_matches(model):
    prompts = _prompts(5, seed=3)
    # 14 blocks of 4 slots cannot hold five 40-60 token sequences at once: some get preempted
    engine = Engine(model, ByteTokenizer(), EngineConfig(block_size=4, num_blocks=24, prefix_caching=False))
    assert _run_with_arrivals(engine, prompts, 24, arrive_every=1) == _alone(model, prompts, 24)
    assert engine.scheduler.num_preemptions > 0
    assert engine.blocks.num_used == 0


def test_abort_frees_blocks(model):
    engine = Engine(model, ByteTokenizer(), EngineConfig(block_size=4, num_blocks=64, prefix_caching=False))
    seq = engine.add_request([5, 6, 7, 8, 9], SamplingParams(max_new_tokens=50, temperature=0))
    for _ in range(3):
        engine.step()
    assert engine.blocks.num_used > 0
    engine.abort(seq)
    assert engine.blocks.num_used == 0 and seq.finish_reason == "abort" and not engine.has_unfinished()


def test_requests_that_can_never_fit_are_refused(model):
    engine = Engine(model, ByteTokenizer(), EngineConfig(block_size=4, num_blocks=4))
    with pytest.raises(ValueError, match="exceeds the KV cache"):
        engine.add_request([1] * 10, SamplingParams(max_new_tokens=20))
    with pytest.raises(ValueError, match="prompt is empty"):
        engine.add_request([], SamplingParams())


def test_stop_strings_and_text(model):
    engine = Engine(model, ByteTokenizer(), EngineConfig(num_blocks=64))
    free = engine.generate([[72, 105]], SamplingParams(max_new_tokens=16, temperature=0))[0]
    assert free.finish_reason == "length" and len(free.token_ids) == 16
    text = free.text
    stop = text[5:7]
    assert len(stop) == 2
    cut = engine.generate([[72, 105]], SamplingParams(max_new_tokens=16, temperature=0, stop=[stop]))[0]
    assert cut.finish_reason == "stop" and cut.text == text[:text.index(stop)]


def test_parallel_samples_share_one_prefill(model):
    engine = Engine(model, ByteTokenizer(), EngineConfig(block_size=4, num_blocks=128))
    prompt = list(range(1, 15))  # 14 tokens: the fourth block is partly filled and shared after the fork
    greedy = SamplingParams(max_new_tokens=10, temperature=0)
    seqs = engine.add_parallel(prompt, [greedy] * 3)
    steps = 0
    while engine.has_unfinished():
        engine.step()
        steps += 1
        if steps == 2:  # after the fork: the children hold the parent's blocks
            assert len({tuple(s.block_table[:3]) for s in seqs}) == 1
    alone = _alone(model, [prompt], 10)[0]
    assert [s.output_ids for s in seqs] == [alone] * 3
    assert engine.blocks.num_used == 0
    sampled = engine.add_parallel(prompt, [SamplingParams(max_new_tokens=10, temperature=1.0, seed=i)
                                           for i in range(3)])
    while engine.has_unfinished():
        engine.step()
    assert len({tuple(s.output_ids) for s in sampled}) > 1  # each sample follows its own seed


def test_abort_before_fork_aborts_siblings(model):
    engine = Engine(model, ByteTokenizer(), EngineConfig(block_size=4, num_blocks=64))
    seqs = engine.add_parallel([1, 2, 3], [SamplingParams(max_new_tokens=5)] * 2)
    engine.abort(seqs[0])
    assert all(s.finish_reason == "abort" for s in seqs) and not engine.has_unfinished()


def _fused_step_rows(monkeypatch) -> list[int]:
    """Rows of each paged fused step (decode_layers_paged call) that runs, so tests see that it ran."""
    ext = gemv.extension()
    rows, real = [], ext.decode_layers_paged

    def spy(plan, x, *args, **kwargs):
        rows.append(x.shape[0])
        return real(plan, x, *args, **kwargs)

    monkeypatch.setattr(ext, "decode_layers_paged", spy)
    return rows


def _both_paths(engine: Engine) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Run every step twice over the same cache, by the modules, then with the fused step allowed
    (the engine samples from that one); returns the list it fills with (fused, modules) logits."""
    run, pairs = engine.runner.run, []

    def run_both(batch):
        with fused_decode.disabled():
            reference, _ = run(batch)
        logits, sampling = run(batch)
        pairs.append((logits, reference))
        return logits, sampling

    engine.runner.run = run_both
    return pairs


def _decode_together(engine: Engine, prompts, max_new: list[int]) -> tuple[list[list[int]], bool]:
    """Add all requests at once (one prefill step, then decode-only steps) and run them out; returns
    their output ids and whether some block table ever had a gap (keys in non-adjacent blocks)."""
    seqs = [engine.add_request(p, SamplingParams(max_new_tokens=n, temperature=0)) for p, n in zip(prompts, max_new)]
    gapped = False
    while engine.has_unfinished():
        engine.step()
        gapped |= any(b != a + 1 for s in seqs for a, b in zip(s.block_table, s.block_table[1:]))
    return [s.output_ids for s in seqs], gapped


@needs_kernels
def test_decode_steps_run_fused_over_the_paged_cache(model, monkeypatch):
    """12 sequences of different lengths in 4-slot blocks, decoding past Gemma 3's window of 8 and
    finishing one by one: every decode-only step (12 rows down to 1) equals the modules' step."""
    rows = _fused_step_rows(monkeypatch)
    engine = Engine(model, ByteTokenizer(), EngineConfig(block_size=4, num_blocks=256, prefix_caching=False))
    pairs = _both_paths(engine)
    prompts, max_new = _prompts(12, seed=5), [4 + 2 * i for i in range(12)]
    outputs, gapped = _decode_together(engine, prompts, max_new)
    assert gapped and max(rows) == 12 and min(rows) == 1 and len(rows) == len(pairs) - 1  # all but the prefill
    for fused, reference in pairs:
        torch.testing.assert_close(fused, reference, rtol=1e-4, atol=1e-4)
    with fused_decode.disabled():  # the reference: each request alone through the modules' static-cache path
        alone = [generate_ids(model, [p], SamplingParams(max_new_tokens=n, temperature=0))[0]
                 for p, n in zip(prompts, max_new)]
    assert outputs == alone


@needs_kernels
def test_fused_paged_steps_mix_long_and_short_sequences(monkeypatch, two_threads):
    """A 180-token prompt beside 1- and 2-token ones, one KV head, 2 threads: attention cuts each row's
    keys into 2 parts, so the 1-token row gets an empty part, which the merge must skip."""
    torch.manual_seed(0)
    model = build_model(Config.from_name("tiny-llama", n_kv_head=1)).eval()
    rows = _fused_step_rows(monkeypatch)
    engine = Engine(model, ByteTokenizer(), EngineConfig(block_size=16, num_blocks=64, prefix_caching=False))
    pairs = _both_paths(engine)
    rng = random.Random(7)
    prompts = [[rng.randrange(1, 256) for _ in range(n)] for n in (180, 1, 2)]
    _decode_together(engine, prompts, [5, 5, 5])
    assert max(rows) == 3
    for fused, reference in pairs:
        torch.testing.assert_close(fused, reference, rtol=1e-4, atol=1e-4)


@needs_kernels
def test_int4_decode_steps_run_fused_up_to_8_sequences(monkeypatch):
    """int4 products take at most 8 rows: of 10 sequences finishing one by one, the steps of 9 or 10
    take the modules and the later ones (8 rows down to 1) the fused step; each equals the modules'."""
    torch.manual_seed(0)
    net = quantize_model(build_model(Config.from_name("tiny-llama")).eval(), QuantConfig(method="int4", group_size=32))
    rows = _fused_step_rows(monkeypatch)
    engine = Engine(net, ByteTokenizer(), EngineConfig(block_size=4, num_blocks=256, prefix_caching=False))
    pairs = _both_paths(engine)
    _decode_together(engine, _prompts(10, seed=6), [3 + 2 * i for i in range(10)])
    assert max(rows) == 8 and min(rows) == 1
    assert any(len(fused) > 8 for fused, _ in pairs[1:])  # decode steps of more than 8 ran, by the modules
    for fused, reference in pairs:
        torch.testing.assert_close(fused, reference, **INT4_TOLERANCE)


def test_async_engine_lets_a_new_request_in_while_another_runs():
    """The server's open() must not wait for running requests to finish (Python locks are not fair):
    a request opened while another decodes gets its first token before the other is done."""
    import asyncio
    import time

    from lmforge.serving.async_engine import AsyncEngine

    net = build_model(Config.from_name("tiny-llama", block_size=1024)).eval()
    forward = net.forward

    def slow_forward(*args, **kwargs):  # a real model's step holds the lock for tens of ms
        time.sleep(0.01)
        return forward(*args, **kwargs)

    net.forward = slow_forward
    engine = AsyncEngine(Engine(net, ByteTokenizer(), EngineConfig(block_size=16, num_blocks=256)))
    long = SamplingParams(temperature=0, max_new_tokens=200, ignore_eos=True)
    short = SamplingParams(temperature=0, max_new_tokens=4, ignore_eos=True)

    async def scenario() -> bool:
        stream = engine.open(list(b"a long request"), long)
        first = aiter(stream)
        for _ in range(20):  # it is decoding; now a second request arrives
            await anext(first)
        second = aiter(engine.open(list(b"short"), short))
        await anext(second)
        return not stream.seq.is_finished

    try:
        first_still_running = asyncio.run(scenario())
    finally:
        engine.shutdown(timeout=5)
    assert first_still_running, "the second request waited for the first one to finish"


@pytest.mark.parametrize("name", ["tiny-alibi", "tiny-sinusoidal"])
def test_engine_equals_generate_for_alibi_and_sinusoidal_positions(name):
    """ALiBi's bias follows each sequence's own positions over its paged keys, in decode and prefill chunks."""
    torch.manual_seed(0)
    model = build_model(Config.from_name(name)).eval()
    init_weights(model, std=0.1)  # large enough that positions decide the greedy tokens
    prompts = _prompts(5, seed=3, shared_prefix=list(range(1, 20)))
    engine = Engine(model, ByteTokenizer(), EngineConfig(block_size=8, num_blocks=256, max_num_batched_tokens=24))
    assert _run_with_arrivals(engine, prompts, 16) == _alone(model, prompts, 16)
    assert engine.blocks.num_used == 0
