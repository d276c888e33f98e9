"""EWC: the penalty against its formula on hand-made tensors, the Fisher against a hand computation on a
tiny model, zero penalty at theta*, the safetensors round trip and the wrapped objective."""

from __future__ import annotations

import pytest
import torch

from lmforge.config import Config
from lmforge.model.transformer import build_model
from lmforge.training.data import Batches, build_rows
from lmforge.training.lora import LoRAConfig, apply_lora
from lmforge.training.objectives.ewc import (anchor, estimate_fisher, ewc_penalty, load_ewc, save_ewc, trained,
                                             with_ewc)
from lmforge.training.objectives.sft import sft_loss


def test_penalty_equals_formula():
    p = {"a": torch.tensor([1.0, 2.0, 3.0]), "b": torch.tensor([[0.5, -1.0]])}
    f = {"a": torch.tensor([0.1, 0.0, 2.0]), "b": torch.tensor([[4.0, 1.0]])}
    star = {"a": torch.tensor([0.0, 5.0, 1.0]), "b": torch.tensor([[0.0, 0.0]])}
    # (lambda/2) * [0.1*1 + 0*9 + 2*4 + 4*0.25 + 1*1] = 1.5 * 10.1
    torch.testing.assert_close(ewc_penalty(p, f, star, 3.0), torch.tensor(1.5 * 10.1))
    assert float(ewc_penalty(star, f, star, 3.0)) == 0.0


def _lora_model():
    torch.manual_seed(0)
    model = build_model(Config.from_name("tiny-llama", vocab_size=260))
    apply_lora(model, LoRAConfig(rank=2, alpha=4.0, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # B = 0 at init gives lora_A no gradient; move off it so every tensor is tested
        for n, p in trained(model).items():
            p.normal_(0, 0.05)
    return model


def test_fisher_equals_hand_computation(tokenizer, alpaca_file):
    model = _lora_model()
    batches = Batches(build_rows(alpaca_file, tokenizer, "chat", 64, False), 3, tokenizer.pad_id).all()
    fisher = estimate_fisher(model, sft_loss, batches, n_batches=3)
    params = trained(model)
    expected = {n: torch.zeros_like(p) for n, p in params.items()}
    for batch in batches[:3]:
        model.zero_grad()
        sft_loss(model, batch).backward()  # mean token NLL of the batch's labels
        for n, p in params.items():
            expected[n] += p.grad ** 2 / 3
    assert set(fisher) == set(params) and all("lora_" in n for n in fisher)
    for n in params:
        torch.testing.assert_close(fisher[n], expected[n], rtol=1e-5, atol=1e-12)
    assert sum(float(f.sum()) for f in fisher.values()) > 0


def test_zero_penalty_at_anchor_and_wrapped_objective(tokenizer, alpaca_file, tmp_path):
    model = _lora_model()
    batch = Batches(build_rows(alpaca_file, tokenizer, "chat", 64, False), 4, tokenizer.pad_id).next()
    fisher = {n: torch.rand_like(p) for n, p in trained(model).items()}
    star = anchor(model)
    path = save_ewc(tmp_path / "ewc.safetensors", fisher, star)
    fisher2, star2 = load_ewc(path, model)
    assert all(torch.equal(fisher[n], fisher2[n]) and torch.equal(star[n], star2[n]) for n in fisher)
    model.train()
    objective = with_ewc(sft_loss, fisher2, star2, lam=100.0)
    torch.testing.assert_close(objective(model, batch), sft_loss(model, batch))  # theta = theta*: no penalty
    with torch.no_grad():
        for p in trained(model).values():
            p.add_(0.1)
    expected = sft_loss(model, batch) + ewc_penalty(trained(model), fisher, star, 100.0)
    torch.testing.assert_close(objective(model, batch), expected)
    model.eval()  # held-out losses stay the plain objective
    torch.testing.assert_close(objective(model, batch), sft_loss(model, batch))


def test_ewc_file_of_another_adapter_is_refused(tmp_path):
    model = _lora_model()
    path = save_ewc(tmp_path / "e.safetensors", {"x": torch.zeros(1)}, {"x": torch.zeros(1)})
    with pytest.raises(ValueError, match="another model/adapter"):
        load_ewc(path, model)
