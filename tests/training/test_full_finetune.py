"""Full fine-tuning: every weight gets a gradient, tied weights stay one tensor through steps and a resume
(saved once), 8-bit AdamW runs, the loss falls, and the exported directory loads in transformers."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from lmforge.config import Config
from lmforge.model.transformer import build_model
from lmforge.training.data import Batches, build_rows
from lmforge.training.full import apply_full, save_full, tied
from lmforge.training.objectives import sft_loss
from lmforge.training.trainer import TrainConfig, train

from .conftest import VOCAB


def _model():
    torch.manual_seed(0)
    return apply_full(build_model(Config.from_name("tiny-llama", vocab_size=VOCAB, block_size=512)))


def test_every_parameter_gets_a_gradient_and_the_head_stays_tied(tokenizer, alpaca_file):
    model = _model()
    rows = build_rows(alpaca_file, tokenizer, "alpaca", 256, packing=False)
    batch = Batches(rows, 4, tokenizer.pad_id).next()
    sft_loss(model, {**batch, "loss_tokens": int((batch["labels"] != -100).sum())}).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert tied(model) and "lm_head.weight" not in dict(model.named_parameters())


class Crash(RuntimeError):
    pass


def _run(tokenizer, alpaca_file, out, crash_at=None):
    """6 steps of 8-bit AdamW, checkpoints every 2; with crash_at the objective dies at that call (a kill)."""
    model = _model()
    rows = build_rows(alpaca_file, tokenizer, "alpaca", 256, packing=False)
    cfg = TrainConfig(max_steps=6, micro_batch=2, lr=3e-3, warmup_steps=1, save_every=2, eval_every=3,
                      optimizer="adamw8bit", progress=False, gradient_checkpointing=False)
    calls = {"n": 0}

    def objective(model, batch):
        calls["n"] += 1
        if crash_at is not None and calls["n"] == crash_at:
            raise Crash
        return sft_loss(model, batch)

    train(model, objective, Batches(rows, 2, tokenizer.pad_id, seed=0), cfg, out,
          eval_batches=Batches(rows[:4], 2, tokenizer.pad_id).all())
    return model


def _curve(out):
    return [(r["step"], r["loss"], r.get("eval_loss")) for r in map(json.loads, (out / "metrics.jsonl").open())]


def test_resume_after_a_crash_keeps_tied_weights_and_the_curve(tokenizer, alpaca_file, tmp_path):
    reference = _run(tokenizer, alpaca_file, tmp_path / "ref")
    with pytest.raises(Crash):
        _run(tokenizer, alpaca_file, tmp_path / "killed", crash_at=7)  # in step 5: after the step-4 checkpoint
    resumed = _run(tokenizer, alpaca_file, tmp_path / "killed")
    assert tied(reference) and tied(resumed)
    assert _curve(tmp_path / "killed") == _curve(tmp_path / "ref")
    curve = _curve(tmp_path / "ref")
    assert curve[-1][2] < curve[2][2] and curve[-1][1] < curve[0][1]  # eval loss and train loss fall
    last = tmp_path / "ref" / "checkpoints" / "step-0000006" / "trainable.safetensors"
    with safe_open(str(last), "pt") as f:
        keys = set(f.keys())
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys  # the tied tensor saved once
    for name, p in reference.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], p)


def test_export_loads_in_transformers_with_our_logits(tokenizer, tmp_path):
    transformers = pytest.importorskip("transformers")
    model = _model()
    with torch.no_grad():  # a step's worth of change, so the check is not of the random init alone
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    path = save_full(model.eval(), tokenizer, tmp_path / "model")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    ids = torch.randint(0, VOCAB, (2, 13))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, model(ids), atol=1e-5, rtol=1e-5)
    assert (path / "tokenizer.json").is_file()


def test_low_precision_weights_are_refused():
    model = build_model(Config.from_name("tiny-llama")).to(torch.bfloat16)
    with pytest.raises(ValueError, match="fp32 master weights.*bfloat16"):
        apply_full(model)
