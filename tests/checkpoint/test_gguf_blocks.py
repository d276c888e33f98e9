"""GGUF weights kept in their blocks: the layers against their dequantized weights, and native loading
against the float32 load of the same file (tiny written files and the two real models)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter
from gguf.quants import dequantize, quantize

from lmforge.checkpoint import gguf_blocks
from lmforge.checkpoint.gguf import _split_qkv
from lmforge.checkpoint.gguf_blocks import BlockTensor, GGUFEmbedding, GGUFLinear, dequantize_model, random_blocks
from lmforge.checkpoint.load import load_model
from lmforge.config import Config
from lmforge.generation.generate import generate_ids
from lmforge.generation.sampling import SamplingParams
from lmforge.kernels import gemv

GGUF_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
              "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down",
              "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def reference(blocks: torch.Tensor, qtype: Q, k: int) -> torch.Tensor:
    return torch.from_numpy(dequantize(blocks.numpy(), qtype).astype(np.float32).reshape(-1, k))


def linear(qtype: Q, n: int, k: int, bias: bool = False) -> GGUFLinear:
    g = torch.Generator().manual_seed(n)
    tensor = BlockTensor(random_blocks(qtype, n, k, g), qtype, (n, k))
    return GGUFLinear.from_blocks(tensor, torch.randn(n, generator=g) if bias else None)


@pytest.mark.parametrize("qtype", [Q.Q4_1, Q.Q4_K], ids=lambda t: t.name)
@pytest.mark.parametrize("rows", [1, 5, 64, 150, 600])
def test_linear_forward_equals_the_dequantized_weight(qtype, rows, monkeypatch):
    """<= 512 rows on the kernel (64 per call), more by tiles of dequantized rows (TILE_VALUES shrunk:
    several tiles)."""
    monkeypatch.setattr(gguf_blocks, "TILE_VALUES", 256 * 512)
    layer = linear(qtype, 600, 512, bias=True)
    x = torch.randn(rows, 1, 512)
    expected = F.linear(x, reference(layer.blocks, qtype, 512), layer.bias)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-5 * float(expected.abs().max()))
    assert torch.equal(layer.weight, reference(layer.blocks, qtype, 512))
    assert layer.dtype == torch.float32 and layer.device.type == "cpu"


def test_linear_without_kernels_and_under_autograd(monkeypatch):
    layer = linear(Q.Q5_0, 40, 64)
    x = torch.randn(3, 64, requires_grad=True)
    expected = x.detach() @ reference(layer.blocks, Q.Q5_0, 64).t()
    layer(x).sum().backward()  # autograd: the tiled path, gradients reach x
    torch.testing.assert_close(x.grad, reference(layer.blocks, Q.Q5_0, 64).sum(0).expand(3, 64))
    monkeypatch.setattr(gemv, "extension", lambda: None)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_embedding_dequantizes_the_rows_it_looks_up():
    blocks = random_blocks(Q.Q8_0, 100, 64)
    table = GGUFEmbedding.from_blocks(BlockTensor(blocks, Q.Q8_0, (100, 64)))
    ids = torch.tensor([[3, 99, 3], [0, 7, 42]])
    assert torch.equal(table(ids), reference(blocks, Q.Q8_0, 64)[ids])
    with pytest.raises(IndexError, match=r"\[0, 100\)"):
        table(torch.tensor([100]))
    head = GGUFLinear.tied_to(table)
    assert head.blocks is table.blocks and (head.in_features, head.out_features) == (64, 100)


def test_wrong_type_and_width_are_named():
    with pytest.raises(ValueError, match="not Q5_1"):
        GGUFLinear(64, 8, Q.Q5_1)
    with pytest.raises(ValueError, match="whole number of 256-weight blocks"):
        GGUFLinear(64, 8, Q.Q4_K)


def test_gpt2_qkv_split_keeps_blocks():
    config = Config.from_name("tiny-gpt2")
    blocks = random_blocks(Q.Q8_0, 3 * 64, 64)
    parts = _split_qkv("model.layers.0.self_attn.qkv.weight", BlockTensor(blocks, Q.Q8_0, (192, 64)), config)
    full = reference(blocks, Q.Q8_0, 64)
    for i, p in enumerate("qkv"):
        part = parts[f"model.layers.0.self_attn.{p}_proj.weight"]
        assert torch.equal(part.dequantize(), full[64 * i:64 * (i + 1)])


def write_tiny_gguf(path: Path, types: dict[str, Q]) -> Config:
    """A tiny LLaMA GGUF (tied embedding) whose linear weights have the given types (random blocks for
    the K types, which gguf.quants cannot quantize); returns its config."""
    config = Config.from_name("tiny-llama", n_embd=256, intermediate_size=512, n_head=4, n_kv_head=2)
    torch.manual_seed(0)
    w = GGUFWriter(str(path), "llama")
    for add, value in ((w.add_block_count, config.n_layer), (w.add_context_length, config.block_size),
                       (w.add_embedding_length, config.n_embd), (w.add_feed_forward_length, config.intermediate_size),
                       (w.add_head_count, config.n_head), (w.add_head_count_kv, config.n_kv_head),
                       (w.add_rope_freq_base, config.rope_theta), (w.add_layer_norm_rms_eps, config.norm_eps),
                       (w.add_vocab_size, config.vocab_size)):
        add(value)
    shapes = {"attn_q": (256, 256), "attn_k": (128, 256), "attn_v": (128, 256), "attn_output": (256, 256),
              "ffn_gate": (512, 256), "ffn_up": (512, 256), "ffn_down": (256, 512)}
    w.add_tensor("token_embd.weight", quantize(np.random.randn(256, 256).astype(np.float32) * 0.1, Q.Q8_0),
                 raw_shape=(256, 272), raw_dtype=Q.Q8_0)
    w.add_tensor("output_norm.weight", np.ones(256, dtype=np.float32))
    for layer in range(config.n_layer):
        for norm in ("attn_norm", "ffn_norm"):
            w.add_tensor(f"blk.{layer}.{norm}.weight", np.ones(256, dtype=np.float32))
        for name, (n, k) in shapes.items():
            qtype = types.get(name, Q.Q4_0)
            if qtype in (Q.Q4_K, Q.Q6_K):
                data = random_blocks(qtype, n, k, torch.Generator().manual_seed(n + layer)).numpy()
            else:
                data = quantize(np.random.randn(n, k).astype(np.float32) * 0.05, qtype)
            w.add_tensor(f"blk.{layer}.{name}.weight", data, raw_shape=data.shape, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return config


def test_native_load_keeps_blocks_ties_the_head_and_equals_the_float_load(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, {"attn_q": Q.Q4_K, "ffn_down": Q.Q6_K, "attn_v": Q.Q8_0, "ffn_up": Q.Q5_0,
                           "attn_output": Q.Q4_1})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every type has a kernel: no warning
        native = load_model(path)
    plain = load_model(path, dtype=torch.float32)
    assert isinstance(native.model.layers[0].self_attn.q_proj, GGUFLinear)
    assert native.lm_head.blocks is native.model.embed_tokens.blocks
    assert type(plain.model.layers[0].self_attn.q_proj) is not GGUFLinear
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(native(ids), plain(ids), rtol=1e-5, atol=1e-4)
        dequantize_model(native)  # back to plain fp32 modules, still tied, same logits
        assert not any(isinstance(m, (GGUFLinear, GGUFEmbedding)) for m in native.modules())
        assert native.lm_head.weight is native.model.embed_tokens.weight
        torch.testing.assert_close(native(ids), plain(ids), rtol=1e-5, atol=1e-4)


def test_a_type_without_kernel_falls_back_with_one_warning(tmp_path):
    path = tmp_path / "tiny-q5_1.gguf"
    write_tiny_gguf(path, {"ffn_gate": Q.Q5_1, "attn_k": Q.Q5_1})
    with pytest.warns(UserWarning, match=r"Q5_1 have no lmforge kernel: 4 tensors") as caught:
        native = load_model(path)
    assert len([w for w in caught if "lmforge kernel" in str(w.message)]) == 1
    assert type(native.model.layers[0].mlp.gate_proj) is not GGUFLinear
    assert isinstance(native.model.layers[0].mlp.up_proj, GGUFLinear)
    ids = torch.randint(0, 256, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(native(ids), load_model(path, dtype=torch.float32)(ids), rtol=1e-5, atol=1e-4)


@pytest.fixture(scope="module", params=["smollm2_gguf", "gemma3_gguf"])
def real_pair(request):
    path = request.getfixturevalue(request.param)
    return load_model(path), load_model(path, dtype=torch.float32)


@pytest.mark.real_model
def test_real_native_logits_and_greedy_ids_equal_the_float32_load(real_pair):
    native, plain = real_pair
    assert isinstance(native.model.layers[0].mlp.down_proj, GGUFLinear)
    ids = torch.tensor([[2, 504, 3458, 2135, 13873, 30959, 690, 260, 23790, 2767, 30] * 3])
    with torch.inference_mode():
        got, expected = native(ids), plain(ids)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-3 * float(expected.abs().max()))
    params = SamplingParams(max_new_tokens=32, temperature=0, ignore_eos=True)
    prompt = ids[0, :11].tolist()
    assert generate_ids(native, [prompt], params) == generate_ids(plain, [prompt], params)


def test_float_state_dict_exports_a_native_model_like_its_float_load(tmp_path):
    """Exporters read float_state_dict: a natively loaded model gives the float load's tensors, untouched."""
    from lmforge.checkpoint.gguf_blocks import float_state_dict

    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, {"attn_q": Q.Q4_K, "ffn_down": Q.Q6_K})
    native, plain = load_model(path), load_model(path, dtype=torch.float32)
    got, expected = float_state_dict(native), plain.state_dict()
    assert sorted(got) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name
    assert isinstance(native.model.layers[0].self_attn.q_proj, GGUFLinear)  # the model itself keeps its blocks
