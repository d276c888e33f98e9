"""Bottleneck adapters: the formula, zero-init identity, only adapters train, a tiny overfit, exact
save/load, generation equal to the training forward, keys kept."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from lmforge.config import Config
from lmforge.generation.generate import generate_ids
from lmforge.generation.sampling import SamplingParams
from lmforge.model.transformer import build_model
from lmforge.training.adapters import load_adapter, save_adapter
from lmforge.training.bottleneck import BottleneckConfig, BottleneckLinear, apply_bottleneck, bottleneck_state
from lmforge.training.objectives.forward import hidden_states


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return build_model(Config.from_name("tiny-llama")).eval()


def _logits(model, ids):
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    return model.logits(hidden_states(model, {"input_ids": ids, "positions": positions}))


def _moved(model):
    with torch.no_grad():
        for p in bottleneck_state(model).values():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def test_layer_is_h_plus_up_f_down_h():
    base = nn.Linear(16, 24)
    layer = BottleneckLinear(base, BottleneckConfig(size=4, activation="gelu", scaling=0.5), torch.Generator())
    nn.init.normal_(layer.adapter_up.weight)
    x = torch.randn(3, 16)
    h = base(x)
    expected = h + 0.5 * (torch.nn.functional.gelu(h @ layer.adapter_down.weight.T + layer.adapter_down.bias)
                          @ layer.adapter_up.weight.T + layer.adapter_up.bias)
    torch.testing.assert_close(layer(x), expected)


def test_zero_init_keeps_logits_keys_and_trains_only_adapters():
    model = _tiny()
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        before = model(ids)
    keys = set(model.state_dict())
    apply_bottleneck(model, BottleneckConfig(size=8))
    assert keys <= set(model.state_dict())
    with torch.no_grad():  # up to float rounding: the wrapped linear runs F.linear, not the GEMV kernel
        torch.testing.assert_close(model(ids), before, atol=1e-6, rtol=1e-6)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    n_layer = model.config.n_layer
    assert trainable == set(bottleneck_state(model)) and len(trainable) == n_layer * 2 * 4


def test_mlp_only_placement():
    model = apply_bottleneck(_tiny(), BottleneckConfig(size=4, placement="mlp"))
    names = set(bottleneck_state(model))
    assert names and all(".mlp.down_proj.adapter_" in n for n in names)


def test_tiny_overfit_loss_goes_down():
    model = apply_bottleneck(_tiny(), BottleneckConfig(size=16)).train()
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(15):
        logits = _logits(model, ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.15  # a random frozen base leaves the adapters little to fit


def test_save_load_round_trips_exactly_and_generation_matches_training_forward(tmp_path):
    model = _moved(apply_bottleneck(_tiny(), BottleneckConfig(size=8, activation="relu", scaling=2.0)))
    save_adapter(model, tmp_path / "adapter", base_model="tiny-llama")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "BOTTLENECK" and cfg["library"] == "lmforge" and cfg["bottleneck_size"] == 8
    again = load_adapter(_tiny(), tmp_path / "adapter")
    for name, p in bottleneck_state(model).items():
        assert torch.equal(p, bottleneck_state(again)[name])
    ids = torch.randint(0, model.config.vocab_size, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(again(ids), model(ids), atol=0, rtol=0)
        out = generate_ids(again, [ids[0].tolist()], SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True))
        full = torch.cat([ids, torch.tensor([out[0][:-1]])], dim=1)
        training = _logits(again, full)[0, ids.shape[1] - 1:].argmax(-1)
    assert out[0] == training.tolist()


def test_adapters_for_another_model_are_refused(tmp_path):
    save_adapter(apply_bottleneck(_tiny(), BottleneckConfig(size=8)), tmp_path / "adapter")
    other = build_model(Config.from_name("tiny-llama"))
    other.model.layers = other.model.layers[:1]
    with pytest.raises(ValueError, match="do not fit"):
        load_adapter(other, tmp_path / "adapter")
