"""GPU speed smoke test on a random model with SmolLM2-135M's shapes (no weights needed).

    python bench/gpu_smoke.py      # on a machine with CUDA
"""

from __future__ import annotations

import time

import torch

from lmforge.config import Config
from lmforge.generation.generate import generate_ids
from lmforge.generation.sampling import SamplingParams
from lmforge.model.transformer import build_model
from lmforge.serving.engine import Engine, EngineConfig


class Ids:
    """A stand-in tokenizer over raw ids (the speed test never shows text)."""

    stop_ids, pad_id = set(), 0

    def stream_decoder(self, skip_special_tokens=True):
        class Decoder:
            def add(self, token):
                return ""

            def flush(self):
                return ""
        return Decoder()


def main() -> None:
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        model = build_model(Config.from_name("smollm2-135m"), device="cuda").to(dtype).eval()
        prompt = torch.randint(0, 49152, (256,)).tolist()
        params = SamplingParams(max_new_tokens=128, temperature=0, ignore_eos=True)
        generate_ids(model, [prompt[:16]], SamplingParams(max_new_tokens=8, temperature=0))
        torch.cuda.synchronize()
        start = time.perf_counter()
        generate_ids(model, [prompt], params)
        torch.cuda.synchronize()
        single = 128 / (time.perf_counter() - start)
        engine = Engine(model, Ids(), EngineConfig(kv_cache_mib=4096, max_num_seqs=64))
        prompts = [torch.randint(0, 49152, (64,)).tolist() for _ in range(64)]
        start = time.perf_counter()
        outs = engine.generate(prompts, params)
        torch.cuda.synchronize()
        batched = sum(len(o.token_ids) for o in outs) / (time.perf_counter() - start)
        print(f"{torch.cuda.get_device_name()} {str(dtype):>15}: batch-1 decode {single:.0f} tok/s, "
              f"engine 64 x 128 tokens {batched:.0f} tok/s")


if __name__ == "__main__":
    main()
