"""Multi-LoRA serving: in one batch mixing 3 adapters and the base, each request's tokens equal those
of the model with its adapter merged; adapters load and unload at run time; another base is refused."""

from __future__ import annotations

import json
import random

import pytest
import torch

from lmforge.config import Config
from lmforge.generation.generate import generate_ids
from lmforge.generation.sampling import SamplingParams
from lmforge.model.transformer import build_model
from lmforge.serving.engine import Engine, EngineConfig
from lmforge.serving.multi_lora import attach
from lmforge.training.adapters import load_adapter, save_adapter
from lmforge.training.lora import LoRAConfig, apply_lora, merge_lora

TARGETS = [["q_proj", "v_proj"], ["q_proj", "k_proj", "o_proj", "down_proj"], ["gate_proj", "up_proj", "v_proj"]]


class ByteTokenizer:
    stop_ids: set[int] = set()
    pad_id = 0

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(text.encode())

    def stream_decoder(self, skip_special_tokens: bool = True):
        from tests.serving.test_engine import _ByteDecoder
        return _ByteDecoder()


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    return build_model(Config.from_name("tiny-llama")).eval()


@pytest.fixture(scope="module")
def adapters(base, tmp_path_factory):
    """Three saved adapters with non-zero updates (B randomised), different ranks and targets."""
    out = {}
    for i, targets in enumerate(TARGETS):
        model = _copy(base)
        apply_lora(model, LoRAConfig(rank=2 + i, alpha=8.0, target_modules=targets))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.3)
        path = tmp_path_factory.mktemp(f"adapter{i}")
        save_adapter(model, path, base_model="tiny-llama")
        out[f"a{i}"] = path
    return out


def _copy(model):
    """A fresh model with the same weights (deepcopy cannot copy a cached fused-kernel plan)."""
    fresh = build_model(model.config).eval()
    fresh.load_state_dict(model.state_dict())
    return fresh


def _merged(base, path):
    model = load_adapter(_copy(base), path)
    merge_lora(model)
    return model.eval()


def test_mixed_batch_equals_each_merged_model(base, adapters) -> None:
    engine = Engine(_copy(base), ByteTokenizer(), EngineConfig(block_size=8, num_blocks=256))
    registry = attach(engine, "tiny-llama")
    for name, path in adapters.items():
        registry.load(name, path)
    rng = random.Random(0)
    shared = [rng.randrange(1, 256) for _ in range(20)]  # the same prompt under every adapter: no cache sharing
    requests = [(shared, None), (shared, "a0"), (shared, "a1"), (shared, "a2")]
    requests += [([rng.randrange(1, 256) for _ in range(rng.randrange(3, 30))], rng.choice([None, "a0", "a1", "a2"]))
                 for _ in range(8)]
    params = SamplingParams(max_new_tokens=10, temperature=0)
    seqs = [engine.add_request(p, params, adapter=a) for p, a in requests]
    while engine.has_unfinished():
        engine.step()
    references = {None: base, **{name: _merged(base, path) for name, path in adapters.items()}}
    for seq, (prompt, adapter) in zip(seqs, requests):
        assert seq.output_ids == generate_ids(references[adapter], [prompt], params)[0], adapter
    outputs = {tuple(s.output_ids) for s in seqs[:4]}
    assert len(outputs) > 1  # the adapters change the tokens: the test can fail


def test_unload_reload_and_refusals(base, adapters, tmp_path) -> None:
    engine = Engine(_copy(base), ByteTokenizer(), EngineConfig(block_size=8, num_blocks=64))
    registry = attach(engine, "tiny-llama")
    registry.load("a0", adapters["a0"])
    with pytest.raises(ValueError, match="already loaded"):
        registry.load("a0", adapters["a1"])
    registry.unload("a0")
    with pytest.raises(ValueError, match="not loaded"):
        engine.add_request([1, 2, 3], SamplingParams(max_new_tokens=2, temperature=0), adapter="a0")
    registry.load("a0", adapters["a1"])  # the name again, another adapter
    config = json.loads((adapters["a2"] / "adapter_config.json").read_text())
    other = tmp_path / "other"
    other.mkdir()
    (other / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "gemma3-270m"}))
    (other / "adapter_model.safetensors").write_bytes((adapters["a2"] / "adapter_model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="trained on 'gemma3-270m'"):
        registry.load("x", other)
    bigger = build_model(Config.from_name("tiny-llama", n_embd=96, n_head=4, n_kv_head=2))
    foreign = apply_lora(bigger, LoRAConfig(rank=2, target_modules=["q_proj"]))
    save_adapter(foreign, tmp_path / "foreign", base_model="tiny-llama")
    with pytest.raises(ValueError, match="another base model"):
        registry.load("y", tmp_path / "foreign")


def test_base_only_batches_keep_the_fused_decode_step(base, adapters) -> None:
    from lmforge.generation import fused_decode
    from lmforge.kernels import gemv

    if gemv.extension() is None:
        pytest.skip("lmforge's CPU kernels could not be built here")
    engine = Engine(_copy(base), ByteTokenizer(), EngineConfig(block_size=8, num_blocks=128))
    registry = attach(engine, "tiny-llama")
    registry.load("a0", adapters["a0"])
    assert fused_decode.plan_for(engine.model) is not None  # the wrapped linears expose their base
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    params = SamplingParams(max_new_tokens=6, temperature=0)
    seqs = [engine.add_request(p, params) for p in prompts]
    while engine.has_unfinished():
        engine.step()
    assert [s.output_ids for s in seqs] == [generate_ids(base, [p], params)[0] for p in prompts]
