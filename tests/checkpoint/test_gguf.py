"""GGUF loading: every common tensor type, the name table, and clean errors on damaged files."""

from __future__ import annotations

import random
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import quantize

from lmforge.checkpoint.errors import CheckpointError
from lmforge.checkpoint.gguf import unpermute_rope
from lmforge.checkpoint.load import load_model
from lmforge.config import Config
from lmforge.model.transformer import build_model

Q = GGMLQuantizationType
NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
         "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down",
         "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def permute_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's convert permutation (half-split -> interleaved), written from its definition."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(model, path: Path, qtype: Q = Q.F32) -> None:
    """A tiny LLaMA-architecture GGUF, written with the gguf library's writer."""
    c: Config = model.config
    w = GGUFWriter(str(path), "llama")
    w.add_block_count(c.n_layer)
    w.add_context_length(c.block_size)
    w.add_embedding_length(c.n_embd)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.n_head)
    w.add_head_count_kv(c.n_kv_head)
    w.add_rope_freq_base(c.rope_theta)
    w.add_layer_norm_rms_eps(c.norm_eps)
    w.add_vocab_size(c.vocab_size)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            continue
        array = tensor.detach().clone()
        if name.endswith("q_proj.weight"):
            array = permute_rope(array, c.n_head)
        if name.endswith("k_proj.weight"):
            array = permute_rope(array, c.n_kv_head)
        parts = name.split(".")
        if name == "model.embed_tokens.weight":
            gguf_name = "token_embd.weight"
        elif name == "model.norm.weight":
            gguf_name = "output_norm.weight"
        else:
            gguf_name = f"blk.{parts[2]}.{NAMES[parts[-2]]}.weight"
        array = array.numpy().astype(np.float32)
        if array.ndim == 2 and qtype not in (Q.F32,):
            data = array.astype(np.float16) if qtype == Q.F16 else quantize(array, qtype)
            w.add_tensor(gguf_name, data, raw_shape=data.shape, raw_dtype=qtype)
        else:
            w.add_tensor(gguf_name, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model(Config.from_name("tiny-llama", n_embd=64, intermediate_size=128)).eval()
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_llama_gguf(model, path)
    return model, path


def test_f32_gguf_loads_exactly(tiny):
    model, path = tiny
    loaded = load_model(path)
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids), atol=0, rtol=0)


# (type, bound on max |logit error| relative to the logit scale); coarser types drift more
@pytest.mark.parametrize("qtype,tolerance", [(Q.F16, 1e-3), (Q.Q8_0, 0.02), (Q.Q5_0, 0.1), (Q.Q4_0, 0.2),
                                             (Q.Q4_1, 0.2)])
def test_quantized_gguf_stays_close_to_float(tiny, tmp_path, qtype, tolerance):
    model, _ = tiny
    path = tmp_path / f"tiny-{qtype.name}.gguf"
    write_llama_gguf(model, path, qtype)
    loaded = load_model(path)
    ids = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        ref, got = model(ids), loaded(ids)
    error = (got - ref).abs().max() / ref.abs().max()
    assert 0 < error < tolerance if qtype != Q.F16 else error < tolerance


def test_unpermute_inverts_llama_cpp_permutation():
    w = torch.randn(12 * 8, 5)
    assert torch.equal(unpermute_rope(permute_rope(w, 12), 12), w)


def test_not_a_gguf_and_missing_files_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="no such GGUF file"):
        load_model(tmp_path / "absent.gguf")
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04 this is a zip, not a gguf" * 10)
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        load_model(bad)
    bad.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_model(bad)


def _mutations(data: bytes, rng: random.Random):
    header_end = min(len(data), 4096)  # metadata and tensor table live at the front
    for _ in range(60):
        cut = rng.randrange(1, len(data))
        yield "truncated", data[:cut]
    for _ in range(120):
        buf = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            pos = rng.randrange(4, header_end)
            buf[pos] ^= 1 << rng.randrange(8)
        yield "flipped", bytes(buf)
    for _ in range(60):
        buf = bytearray(data)
        pos = rng.randrange(8, header_end - 8)  # overwrite what may be a length or count with a huge one
        buf[pos:pos + 8] = rng.choice([2**63 - 1, 2**40, 2**32 + 7, 10**12]).to_bytes(8, "little")
        yield "inflated", bytes(buf)


def test_mutated_files_fail_cleanly_and_fast(tiny, tmp_path):
    _, path = tiny
    data = path.read_bytes()
    rng = random.Random(0)
    outcomes = {"loaded": 0, "rejected": 0}
    target = tmp_path / "mutant.gguf"
    for kind, mutant in _mutations(data, rng):
        target.write_bytes(mutant)
        start = time.perf_counter()
        try:
            load_model(target)
            outcomes["loaded"] += 1
        except CheckpointError as err:
            assert str(err).startswith(str(target)), err
            outcomes["rejected"] += 1
        assert time.perf_counter() - start < 5, f"{kind} mutant took too long"
    assert outcomes["rejected"] > 150  # truncation and inflation must be caught, not loaded
