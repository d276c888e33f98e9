"""Multi-LoRA serving throughput: 16 concurrent requests spread over 4 LoRA adapters vs the same 16 on
the base alone, through lmforge's serving engine (continuous batching, paged KV cache), SmolLM2-135M.

    python bench/bench_multi_lora.py --threads 2

Adapters: rank 16 on all 7 projections, random (non-zero) weights, PEFT layout, loaded with
`serving.multi_lora`. Each request: a different prompt, 64 greedy tokens. Three runs, interleaved:
base alone (no adapters loaded: the fused C++ decode step), base alone with the adapters loaded
(the module path), 4 adapters x 4 requests. Reports generated tokens/s and the ratios.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lmforge import hub  # noqa: E402
from lmforge.checkpoint.load import load  # noqa: E402
from lmforge.generation.sampling import SamplingParams  # noqa: E402
from lmforge.serving.engine import Engine, EngineConfig  # noqa: E402
from lmforge.serving.multi_lora import attach  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapters(path: Path, folder: Path, n: int) -> list[Path]:
    from lmforge.training.adapters import save_adapter
    from lmforge.training.lora import LoRAConfig, apply_lora

    out = []
    for i in range(n):
        model, _ = load(path, dtype=torch.float32)
        apply_lora(model, LoRAConfig(rank=16, alpha=32.0, target_modules=TARGETS))
        torch.manual_seed(i)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02)
        out.append(save_adapter(model, folder / f"a{i}", base_model="smollm2-135m-instruct"))
    return out


def run(engine: Engine, prompts: list[list[int]], adapters: list[str | None], new_tokens: int) -> float:
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0, ignore_eos=True)
    start = time.perf_counter()
    seqs = [engine.add_request(p, params, adapter=a) for p, a in zip(prompts, adapters)]
    while engine.has_unfinished():
        engine.step()
    return sum(len(s.output_ids) for s in seqs) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "multi_lora.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    path = hub.resolve("smollm2-135m-instruct", pull_missing=True)
    net, tok = load(path)
    from lmforge.data.python_faq import faq_pairs

    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": p.question}],
                                                  add_generation_prompt=True), add_special_tokens=False)
               for p in faq_pairs()[:args.clients]]
    config = EngineConfig(max_num_seqs=args.clients, prefix_caching=False)
    plain = Engine(net, tok, config)
    names = [f"a{i}" for i in range(args.adapters)]
    spread = [names[i % len(names)] for i in range(args.clients)]
    results: dict[str, list[float]] = {"base, no adapters loaded": [], "base, adapters loaded": [],
                                       f"{args.adapters} adapters": []}
    with tempfile.TemporaryDirectory() as folder:
        folders = make_adapters(path, Path(folder), args.adapters)
        net2, _ = load(path)
        served = Engine(net2, tok, config)
        registry = attach(served, "smollm2-135m-instruct")
        for name, f in zip(names, folders):
            registry.load(name, f)
        for _ in range(args.rounds):
            results["base, no adapters loaded"].append(run(plain, prompts, [None] * args.clients, args.new_tokens))
            results["base, adapters loaded"].append(run(served, prompts, [None] * args.clients, args.new_tokens))
            results[f"{args.adapters} adapters"].append(run(served, prompts, spread, args.new_tokens))
    best = {k: max(v) for k, v in results.items()}
    base = best["base, no adapters loaded"]
    for k, v in best.items():
        print(f"{k:>28}: {v:7.1f} tokens/s  {v / base:.2f}x")
    Path(args.json).write_text(json.dumps({"threads": torch.get_num_threads(), "clients": args.clients,
                                           "new_tokens": args.new_tokens, "rounds": results, "best": best}, indent=1))


if __name__ == "__main__":
    main()
