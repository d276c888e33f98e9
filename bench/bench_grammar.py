"""Grammar engines for constrained decoding, measured on SmolLM2's 49,152-token vocabulary.

Per engine (llguidance, xgrammar, outlines-core): the tokenizer set-up, the JSON-schema compile time, and
per decoding step the time to fill the next-token bitmask and advance by one token, over a token sequence
that satisfies the schema, at batch 1 and 16. Then lmforge's own constrained generation on the real model:
the step time with and without a JSON-schema constraint at batch 1 and 16 (the overhead the issue bounds).

    .venv/bin/python bench/bench_grammar.py            # engines + end-to-end overhead
    .venv/bin/python bench/bench_grammar.py --engines   # engines only
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from lmforge import hub
from lmforge.tokenizer import Tokenizer, _byte_to_char

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1, "maxItems": 3},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "integer"}},
                    "required": ["city", "zip"], "additionalProperties": False},
    },
    "required": ["name", "age", "tags", "address"],
    "additionalProperties": False,
}
INSTANCE = {"name": "Ada Lovelace", "age": 36, "tags": ["a", "c"], "address": {"city": "London", "zip": 1815}}


def _best(fn, repeats: int = 3) -> float:
    """Best of `repeats` wall times of fn() in seconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def bench_llguidance(tok: Tokenizer, ids: list[int], batch: int) -> dict:
    import llguidance
    import llguidance.torch as lt

    t0 = time.perf_counter()
    lltok = llguidance.LLTokenizer(tok.backend.to_str(), n_vocab=tok.vocab_size, eos_token=tok.eos_id)
    setup = time.perf_counter() - t0
    t0 = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA))
    llguidance.LLMatcher(lltok, grammar)
    compile_s = time.perf_counter() - t0
    bitmask = lt.allocate_token_bitmask(batch, tok.vocab_size)
    executor = llguidance.LLExecutor()

    def run():
        matchers = [llguidance.LLMatcher(lltok, grammar) for _ in range(batch)]
        for token in ids:
            if batch == 1:
                lt.fill_next_token_bitmask(matchers[0], bitmask, 0)
            else:
                lt.fill_next_token_bitmask_par(executor, [(m, i) for i, m in enumerate(matchers)], bitmask)
            for m in matchers:
                assert m.consume_token(token)
        assert all(m.is_accepting() for m in matchers)

    return {"setup_s": setup, "compile_s": compile_s, "step_ms": _best(run) / len(ids) * 1e3}


def bench_xgrammar(tok: Tokenizer, ids: list[int], batch: int) -> dict:
    import transformers
    import xgrammar as xgr

    t0 = time.perf_counter()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok.backend)
    info = xgr.TokenizerInfo.from_huggingface(fast, vocab_size=tok.vocab_size, stop_token_ids=[tok.eos_id])
    compiler = xgr.GrammarCompiler(info, cache_enabled=False)
    setup = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False, separators=(",", ":"))
    compile_s = time.perf_counter() - t0
    bitmask = xgr.allocate_token_bitmask(batch, tok.vocab_size)

    def run():
        matchers = [xgr.GrammarMatcher(compiled) for _ in range(batch)]
        for token in ids:
            for i, m in enumerate(matchers):
                m.fill_next_token_bitmask(bitmask, i)
            for m in matchers:
                assert m.accept_token(token)
        assert all(m.accept_token(tok.eos_id) for m in matchers)

    return {"setup_s": setup, "compile_s": compile_s, "step_ms": _best(run) / len(ids) * 1e3}


def bench_outlines_core(tok: Tokenizer, ids: list[int], batch: int) -> dict:
    import outlines_core as oc

    t0 = time.perf_counter()
    byte_of = {c: b for b, c in _byte_to_char().items()}
    special = {tok.eos_id}
    table: dict[bytes, list[int]] = {}
    for piece, i in tok.backend.get_vocab(with_added_tokens=True).items():
        if i in special:
            continue
        raw = bytes(byte_of[c] for c in piece) if all(c in byte_of for c in piece) else piece.encode()
        table.setdefault(raw, []).append(i)
    vocab = oc.Vocabulary(tok.eos_id, table)
    setup = time.perf_counter() - t0
    t0 = time.perf_counter()
    index = oc.Index(oc.json_schema.build_regex_from_schema(json.dumps(SCHEMA), r"[ ]?"), vocab)
    compile_s = time.perf_counter() - t0
    words = (tok.vocab_size + 31) // 32
    bitmask = torch.zeros(batch, words, dtype=torch.int32)

    def run():
        guides = [oc.Guide(index) for _ in range(batch)]
        for token in ids:
            for i, g in enumerate(guides):
                row = bitmask[i]
                g.write_mask_into(row.data_ptr(), row.numel(), row.element_size())
            for g in guides:
                g.advance(token)
        assert all(g.is_finished() for g in guides)

    return {"setup_s": setup, "compile_s": compile_s, "step_ms": _best(run) / len(ids) * 1e3}


def bench_engines(tok: Tokenizer) -> list[dict]:
    ids = tok.encode(json.dumps(INSTANCE, separators=(",", ":")), add_special_tokens=False)
    rows = []
    for name, fn in [("llguidance", bench_llguidance), ("xgrammar", bench_xgrammar),
                     ("outlines-core", bench_outlines_core)]:
        for batch in (1, 16):
            try:
                rows.append({"engine": name, "batch": batch, "tokens": len(ids), **fn(tok, ids, batch)})
            except Exception as e:  # an engine that fails here is reported, not fatal
                rows.append({"engine": name, "batch": batch, "error": f"{type(e).__name__}: {e}"[:200]})
            print(json.dumps(rows[-1]))
    return rows


def bench_overhead(tok: Tokenizer, steps: int = 48, repeats: int = 3) -> list[dict]:
    """lmforge's TokenStream on the real model: ms per decoding step (prefill excluded), sampled, with and
    without the JSON-schema constraint (mask filled on the worker thread during the forward), batch 1 and 16."""
    from lmforge.checkpoint.load import load_model
    from lmforge.generation.constrained import Constraint
    from lmforge.generation.generate import TokenStream
    from lmforge.generation.sampling import SamplingParams

    model = load_model(hub.resolve("smollm2-135m-instruct")).eval()
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Describe a person as JSON."}]),
                        add_special_tokens=False)
    constraint = Constraint("json_schema", SCHEMA)

    def per_step(batch: int, c: Constraint | None) -> float:
        params = SamplingParams(max_new_tokens=steps, temperature=0.8, seed=0, ignore_eos=True, constraint=c)
        best = float("inf")
        for _ in range(repeats):
            stream = TokenStream(model, [prompt] * batch, params, tok.stop_ids, tokenizer=tok)
            t0 = time.perf_counter()
            for _ in stream:
                pass
            best = min(best, (time.perf_counter() - t0) / stream.steps)
        return best * 1e3

    rows = []
    for batch in (1, 16):
        per_step(batch, constraint)  # warm-up: the grammar's tokenizer view and compile happen once
        plain, constrained = per_step(batch, None), per_step(batch, constraint)
        row = {"batch": batch, "plain_ms_per_step": round(plain, 2), "constrained_ms_per_step": round(constrained, 2),
               "overhead": round(constrained / plain - 1, 4)}
        print(json.dumps(row))
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--engines", action="store_true", help="measure the grammar engines only")
    args = parser.parse_args()
    torch.set_num_threads(1)
    tok = Tokenizer.load(hub.resolve("smollm2-135m-instruct"))
    bench_engines(tok)
    if not args.engines:
        bench_overhead(tok)


if __name__ == "__main__":
    main()
