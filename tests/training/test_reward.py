"""Reward model: the score at the last real token equals transformers' sequence classifier, the Bradley-Terry
loss equals trl RewardTrainer's, the recipe trains and saves a reward model, and bad input is refused."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lmforge import cli
from lmforge.checkpoint.hf import save_hf
from lmforge.config import Config
from lmforge.model.transformer import build_model
from lmforge.training.objectives.reward import RewardModel, bradley_terry_loss
from lmforge.training.preferences import build_pairs, collate_pairs
from lmforge.training.reward import RewardConfig, check_reward_model, load_reward_model

from .conftest import QA, VOCAB, byte_tokenizer, write_jsonl

PAD = 258


def _pairs_file(path: Path, qa: list[tuple[str, str]]) -> Path:
    """The real answer is chosen, a refusal rejected (a pattern even a tiny model learns)."""
    return write_jsonl(path, [{"prompt": q, "chosen": a, "rejected": "Sorry, I cannot say."} for q, a in qa])


@pytest.fixture
def tiny_dir(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    path = save_hf(build_model(Config.from_name("tiny-llama", vocab_size=VOCAB, block_size=512)), tmp_path / "tiny")
    byte_tokenizer().save_hf(path)
    return path


def test_bradley_terry_hand_worked() -> None:
    """-log sigmoid(1 - 0 - 0.5) = log(1 + e^-0.5); -log sigmoid(0 - 2) = log(1 + e^2); centring adds
    c (r_c + r_r)^2."""
    chosen, rejected = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    losses = bradley_terry_loss(chosen, rejected, torch.tensor([0.5, 0.0]), center_coef=0.1)
    assert losses.tolist() == pytest.approx([math.log1p(math.exp(-0.5)) + 0.1, math.log1p(math.exp(2)) + 0.4])


def test_reward_equals_transformers_classifier_and_loss_equals_trl(tiny_dir, tmp_path, tokenizer) -> None:
    """Right-padded pairs of different lengths: our score at each row's last real token equals
    LlamaForSequenceClassification's (same weights, same head), and trl's compute_loss on those rewards
    (margin and center_rewards_coefficient on) equals the mean of our per-pair losses."""
    transformers = pytest.importorskip("transformers")
    trl_reward = pytest.importorskip("trl.trainer.reward_trainer")
    from lmforge.checkpoint.load import load

    decoder, _ = load(tiny_dir, device="cpu", dtype=torch.float32)
    ours = RewardModel(decoder).eval()
    pairs = build_pairs(_pairs_file(tmp_path / "p.jsonl", QA[:4]), tokenizer, "chat", RewardConfig())
    batch = collate_pairs(pairs, PAD)
    assert "valid" in batch and not bool(batch["valid"].all())  # padding present
    with torch.no_grad():
        rewards = ours(batch)
    hf = transformers.LlamaForSequenceClassification.from_pretrained(tiny_dir, num_labels=1, pad_token_id=PAD,
                                                                     dtype=torch.float32).eval()
    with torch.no_grad():
        hf.score.weight.copy_(ours.score.weight)
        theirs = hf(input_ids=batch["input_ids"], attention_mask=batch["valid"].long()).logits.squeeze(-1)
    torch.testing.assert_close(rewards, theirs, rtol=1e-4, atol=1e-5)

    margin = torch.tensor([0.3, 0.0, -0.2, 1.0])
    stub = SimpleNamespace(model=SimpleNamespace(training=False), _metrics={"eval": defaultdict(list)},
                           args=SimpleNamespace(center_rewards_coefficient=0.01), _total_train_tokens=0,
                           accelerator=SimpleNamespace(gather=lambda x: x, gather_for_metrics=lambda x: x))
    fixed = SimpleNamespace(logits=rewards[:, None])  # trl reads outputs.logits; identical rewards in
    trl_loss = trl_reward.RewardTrainer.compute_loss(stub, lambda **_: fixed, {"input_ids": batch["input_ids"],
                                                                                  "attention_mask": batch["valid"],
                                                                                  "margin": margin})
    ours_loss = bradley_terry_loss(rewards[:4], rewards[4:], margin, center_coef=0.01).mean()
    torch.testing.assert_close(ours_loss, trl_loss)


def test_reward_recipe_trains_saves_and_ppo_refuses_another_tokenizer(tiny_dir, tmp_path, capsys) -> None:
    train_file = _pairs_file(tmp_path / "train.jsonl", QA[:8])
    eval_file = _pairs_file(tmp_path / "eval.jsonl", QA[8:])
    out = tmp_path / "rm"
    assert cli.main(["finetune", "--recipe", "reward", "--model", str(tiny_dir), "--data", str(train_file),
                     "--eval-data", str(eval_file), "--out", str(out), "--overrides", "train.max_steps=12",
                     "train.micro_batch=4", "train.grad_accum=1", "train.lr=0.01", "train.warmup_steps=1",
                     "train.eval_every=12", "train.save_every=12", "train.progress=false", "device=cpu",
                     "train.gradient_checkpointing=false"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["eval_loss"] < rows[0]["loss"] and rows[-1]["eval_accuracy"] == 1.0 and "accuracy" in rows[0]
    assert "eval_accuracy: 1.0" in capsys.readouterr().out  # the two held-out pairs, never trained on
    saved = out / "reward_model"
    config = json.loads((saved / "reward_config.json").read_text())
    assert config["base_model"] == str(tiny_dir) and config["vocab_size"] == VOCAB
    for name in ("adapter_config.json", "adapter_model.safetensors", "score.safetensors"):
        assert (saved / name).is_file()
    loaded = load_reward_model(saved)
    batch = collate_pairs(build_pairs(eval_file, byte_tokenizer(), "chat", RewardConfig()), PAD)
    scores = loaded(batch)
    assert bool((scores[:2] > scores[2:]).all())  # the reloaded model still prefers the real answers

    other = build_model(Config.from_name("tiny-llama", vocab_size=VOCAB + 8))
    with pytest.raises(ValueError, match=f"trained for {tiny_dir}.*the policy is other-model"):
        check_reward_model(saved, "other-model", other, byte_tokenizer())
    shuffled = byte_tokenizer()
    shuffled.backend.add_special_tokens(["<extra>"])  # one more token: the same ids no longer mean the same text
    with pytest.raises(ValueError, match="tokenizer"):
        check_reward_model(saved, "other-model", loaded.decoder, shuffled)


def test_ppo_recipe_refuses_a_reward_model_of_another_vocabulary(tiny_dir, tmp_path, capsys) -> None:
    from lmforge.training.reward import save_reward_model

    other_dir = save_hf(build_model(Config.from_name("tiny-llama", vocab_size=VOCAB + 8)), tmp_path / "other")
    other_tok = byte_tokenizer()
    other_tok.backend.add_special_tokens([f"<x{i}>" for i in range(8)])
    other_tok.save_hf(other_dir)
    decoder, _ = __import__("lmforge.checkpoint.load", fromlist=["load"]).load(other_dir, device="cpu")
    from lmforge.training.lora import LoRAConfig, apply_lora

    saved = save_reward_model(RewardModel(apply_lora(decoder, LoRAConfig(rank=2))), tmp_path / "rm", str(other_dir),
                              other_tok)
    code = cli.main(["finetune", "--recipe", "ppo", "--model", str(tiny_dir), "--out", str(tmp_path / "ppo"),
                     "--overrides", f"ppo.reward_model={saved}", "device=cpu", "train.progress=false"])
    err = capsys.readouterr().err
    assert code == 2 and str(other_dir) in err and str(tiny_dir) in err and "vocabulary" in err


def test_preference_record_missing_a_field_is_named(tiny_dir, tmp_path, capsys) -> None:
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "Hi?", "chosen": "Hello.", "rejected": "No."},
                                               {"prompt": "Sky?", "chosen": "Blue."}])
    code = cli.main(["finetune", "--recipe", "reward", "--model", str(tiny_dir), "--data", str(bad),
                     "--out", str(tmp_path / "rm"), "--overrides", "device=cpu", "train.progress=false"])
    err = capsys.readouterr().err
    assert code == 2 and f"{bad}:2" in err and "missing field 'rejected'" in err
