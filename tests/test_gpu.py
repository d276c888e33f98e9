"""CUDA paths: the same logits and tokens as on the CPU (skipped where there is no GPU)."""

from __future__ import annotations

import pytest
import torch

from lmforge.config import Config
from lmforge.generation.beam import beam_generate
from lmforge.generation.generate import generate_ids
from lmforge.generation.sampling import SamplingParams
from lmforge.model.transformer import build_model

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(params=["tiny-llama", "tiny-gpt2", "tiny-gemma3"])
def pair(request):
    torch.manual_seed(0)
    cpu = build_model(Config.from_name(request.param)).eval()
    gpu = build_model(Config.from_name(request.param), device="cuda").eval()
    gpu.load_state_dict(cpu.state_dict())
    return cpu, gpu


def test_logits_equal_cpu(pair):
    cpu, gpu = pair
    ids = torch.randint(0, 256, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(gpu(ids.cuda()).cpu(), cpu(ids), atol=1e-4, rtol=1e-4)


def test_greedy_and_beam_equal_cpu(pair):
    cpu, gpu = pair
    params = SamplingParams(max_new_tokens=24, temperature=0)
    prompts = [[1, 2, 3], list(range(5, 20))]
    assert generate_ids(gpu, prompts, params) == generate_ids(cpu, prompts, params)
    beams = SamplingParams(max_new_tokens=12, temperature=0, num_beams=3)
    assert beam_generate(gpu, [4, 5, 6], beams) == beam_generate(cpu, [4, 5, 6], beams)


def test_engine_on_gpu_equals_generate(pair):
    from lmforge.serving.engine import Engine, EngineConfig

    cpu, gpu = pair

    class Bytes:
        stop_ids, pad_id = set(), 0

        def encode(self, text, add_special_tokens=True):
            return list(text.encode())

        def stream_decoder(self, skip_special_tokens=True):
            class D:
                def add(self, t):
                    return chr(t)

                def flush(self):
                    return ""
            return D()

    engine = Engine(gpu, Bytes(), EngineConfig(num_blocks=64, block_size=8))
    prompts = [[1, 2, 3, 4], list(range(30, 50))]
    params = SamplingParams(max_new_tokens=16, temperature=0)
    got = [c.token_ids for c in engine.generate(prompts, params)]
    assert got == [generate_ids(cpu, [p], params)[0] for p in prompts]


@pytest.mark.real_model
def test_real_model_bf16_on_gpu_stays_close(smollm2_gguf):
    from lmforge.checkpoint.load import load

    cpu, tok = load(smollm2_gguf)
    gpu, _ = load(smollm2_gguf, device="cuda", dtype=torch.bfloat16)
    ids = torch.tensor([tok.encode("The quick brown fox jumps over the lazy dog.")])
    with torch.no_grad():
        ref, got = cpu(ids), gpu(ids.cuda()).float().cpu()
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.8  # bf16 rounding may flip near-ties
    assert (got - ref).abs().max() / ref.abs().max() < 0.05


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs_and_tracks_fp32(dtype):
    torch.manual_seed(0)
    ref = build_model(Config.from_name("tiny-gemma3"), device="cuda").eval()
    half = build_model(Config.from_name("tiny-gemma3"), device="cuda").eval()
    half.load_state_dict(ref.state_dict())
    half = half.to(dtype)
    ids = torch.randint(0, 256, (2, 30), device="cuda")
    with torch.no_grad():
        got, expected = half(ids).float(), ref(ids)
    assert got.dtype == torch.float32 and (got - expected).abs().max() < 0.05 * expected.abs().max()
    assert generate_ids(half, [[1, 2, 3]], SamplingParams(max_new_tokens=8, temperature=0))[0]
