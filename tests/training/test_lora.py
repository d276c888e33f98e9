"""LoRA/DoRA/QLoRA layers: the formula, merge/unmerge, freezing, module swap keeping keys."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lmforge.config import Config
from lmforge.model.transformer import build_model, column_major_linears
from lmforge.training.lora import (LoRAConfig, LoRALinear, QLoRALinear, adapter_state, apply_lora,
                                   merge_and_unload, merge_lora, unmerge_lora)


def _layer(dora: bool = False, bias: bool = True) -> LoRALinear:
    base = nn.Linear(32, 48, bias=bias)
    layer = LoRALinear(base, LoRAConfig(rank=4, alpha=8, dora=dora))
    nn.init.normal_(layer.lora_B.weight)  # B starts at zero; make the update visible
    return layer


def test_lora_output_is_wx_plus_scaled_bax() -> None:
    layer = _layer()
    x = torch.randn(3, 5, 32)
    W, b, A, B = layer.weight, layer.bias, layer.lora_A.weight, layer.lora_B.weight
    expected = x @ W.T + b + (8 / 4) * (x @ A.T @ B.T)
    torch.testing.assert_close(layer(x), expected)


def test_fresh_adapter_is_the_identity() -> None:
    base = nn.Linear(32, 48)
    layer = LoRALinear(base, LoRAConfig(rank=4, dora=True))
    x = torch.randn(2, 32)
    torch.testing.assert_close(layer(x), base(x))


def test_dora_output_matches_formula() -> None:
    layer = _layer(dora=True)
    with torch.no_grad():
        layer.lora_magnitude_vector.mul_(torch.rand(48) + 0.5)
    x = torch.randn(4, 32)
    W = layer.weight + 2.0 * layer.lora_B.weight @ layer.lora_A.weight
    W = layer.lora_magnitude_vector[:, None] * W / W.norm(dim=1, keepdim=True)
    torch.testing.assert_close(layer(x), x @ W.T + layer.bias)


@pytest.mark.parametrize("dora", [False, True])
def test_merge_then_unmerge_returns_the_weights(dora: bool) -> None:
    layer = _layer(dora=dora)
    original = layer.weight.detach().clone()
    x = torch.randn(4, 32)
    before = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), before, atol=1e-5, rtol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(layer.weight, original, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(layer(x), before, atol=1e-5, rtol=1e-5)


def _tiny() -> nn.Module:
    return column_major_linears(build_model(Config.from_name("tiny-llama"))).eval()


def test_apply_lora_keeps_keys_freezes_base_and_keeps_strides() -> None:
    model = _tiny()
    keys = set(model.state_dict())
    w = model.model.layers[0].self_attn.q_proj.weight
    apply_lora(model, LoRAConfig(rank=2, target_modules=["q_proj", "v_proj"]))
    assert keys <= set(model.state_dict())  # base keys unchanged
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, LoRALinear) and layer.weight is w and w.t().is_contiguous()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(adapter_state(model)) and len(trainable) == 2 * 2 * 2


def test_merge_lora_on_model_and_export_unwrap() -> None:
    model = _tiny()
    apply_lora(model, LoRAConfig(rank=2, dora=True))
    for name, p in adapter_state(model).items():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.1)
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        expected = model(ids)
        merge_lora(model)
        torch.testing.assert_close(model(ids), expected, atol=1e-5, rtol=1e-5)
        unmerge_lora(model)
        torch.testing.assert_close(model(ids), expected, atol=1e-5, rtol=1e-5)
        merge_and_unload(model)
        assert not any("lora_" in k for k in model.state_dict())
        torch.testing.assert_close(model(ids), expected, atol=1e-5, rtol=1e-5)


def test_qlora_layer_uses_dequantized_nf4_base() -> None:
    base = nn.Linear(64, 32)
    layer = QLoRALinear(base, LoRAConfig(rank=4, alpha=8, quantize="nf4"))
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(5, 64, requires_grad=True)
    W = layer.base.dequantize()
    assert (W - base.weight).abs().max() < 0.2 * base.weight.abs().max()
    expected = x @ W.T + layer.bias + 2.0 * (x @ layer.lora_A.weight.T @ layer.lora_B.weight.T)
    out = layer(x)
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    assert layer.lora_A.weight.grad is not None and x.grad is not None
    assert not any(isinstance(t, torch.Tensor) and t.is_floating_point() and t.shape == (32, 64)
                   for t in layer.buffers())
    with pytest.raises(ValueError, match="merge"):
        layer.merge()


def test_bad_config_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="rank"):
        LoRAConfig(rank=0)
    with pytest.raises(ValueError, match="target_modules"):
        apply_lora(_tiny(), LoRAConfig(target_modules=["nope"]))


def _weight_bytes(model: nn.Module) -> int:
    tensors = {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def test_qlora_model_weights_shrink_and_logits_stay_close() -> None:
    model, qmodel = _tiny(), _tiny()
    qmodel.load_state_dict(model.state_dict())
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        expected = model(ids)
    before = _weight_bytes(model)
    apply_lora(qmodel, LoRAConfig(rank=4, quantize="nf4"))
    adapters = sum(p.numel() * 4 for p in adapter_state(qmodel).values())
    assert (_weight_bytes(qmodel) - adapters) / before < 0.3  # NF4 body + bf16 tied embedding
    with torch.no_grad():
        got = qmodel(ids)
    assert (got - expected).abs().max() < 0.1 * expected.abs().max()
    qmodel.train()
    loss = qmodel(ids).logsumexp(-1).mean()
    loss.backward()
    assert all(p.grad is not None for p in adapter_state(qmodel).values())
    merge_and_unload(qmodel)
    assert isinstance(qmodel.model.embed_tokens, nn.Embedding) and qmodel.lm_head.weight.dtype == torch.float32
