"""DPO / IPO / SimPO: losses equal trl's on identical inputs, sequence log-probs equal a full-logits gather,
the adapter-off reference equals the base model, accumulation is exact, and a tiny run learns and resumes."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lmforge.config import Config
from lmforge.model.transformer import build_model
from lmforge.training.lora import LoRAConfig, adapter_state, apply_lora, disabled_adapters, merge_lora
from lmforge.training.objectives import count_loss_tokens
from lmforge.training.objectives.dpo import (DPOConfig, PreferenceObjective, preference_loss, reference_logps,
                                             sequence_logps)
from lmforge.training.preferences import PreferencePair, collate_pairs

from .conftest import VOCAB

SCRIPT = Path(__file__).with_name("dpo_script.py")


def _logps(seed: int = 0, B: int = 5):
    g = torch.Generator().manual_seed(seed)
    policy_c, policy_r, ref_c, ref_r = (-40 * torch.rand(B, generator=g, dtype=torch.float64) for _ in range(4))
    len_c, len_r = torch.randint(3, 30, (B,), generator=g), torch.randint(3, 30, (B,), generator=g)
    return policy_c, policy_r, ref_c, ref_r, len_c, len_r


def _trl_dpo(loss_type: str, beta: float, policy_c, policy_r, ref_c, ref_r, len_c, len_r) -> torch.Tensor:
    """trl's DPOTrainer._compute_loss on a stub whose 'model' returns per-token log-probs that sum to the given
    sequence log-probs over each completion (the loss code of trl itself, none of its model plumbing)."""
    from trl import DPOTrainer

    B, T = len(policy_c), int(max(len_c.max(), len_r.max())) + 2
    lens = torch.cat([len_c, len_r])
    completion = (torch.arange(T)[None] >= 1) & (torch.arange(T)[None] < 1 + lens[:, None])  # (2B, T)
    log_probs = torch.zeros(2 * B, T - 1, dtype=policy_c.dtype)
    log_probs[:, 0] = torch.cat([policy_c, policy_r])  # the whole sum on the first completion position
    zeros = torch.zeros(2 * B, T - 1)
    outputs = SimpleNamespace(log_probs=log_probs, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())
    stub = SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=SimpleNamespace(device="cpu", gather_for_metrics=lambda x: x, gather=lambda x: x),
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
        loss_types=[loss_type], loss_weights=[1.0], beta=beta, label_smoothing=0.0, use_weighting=False,
        _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.zeros(2 * B, T, dtype=torch.long), "attention_mask": torch.ones(2 * B, T),
              "completion_mask": completion.long(), "ref_chosen_logps": ref_c, "ref_rejected_logps": ref_r}
    return DPOTrainer._compute_loss(stub, lambda **kw: outputs, inputs, return_outputs=False)


@pytest.mark.parametrize("loss,beta", [("sigmoid", 0.1), ("sigmoid", 0.5), ("ipo", 0.1), ("ipo", 1.0)])
def test_dpo_and_ipo_equal_trl(loss, beta) -> None:
    pytest.importorskip("trl")
    args = _logps()
    losses, chosen_r, rejected_r = preference_loss(*args, DPOConfig(loss=loss, beta=beta))
    torch.testing.assert_close(losses.mean(), _trl_dpo(loss, beta, *args))
    policy_c, policy_r, ref_c, ref_r, _, _ = args
    torch.testing.assert_close(chosen_r, beta * (policy_c - ref_c))  # DPO section 5's implicit reward
    torch.testing.assert_close(rejected_r, beta * (policy_r - ref_r))


def _cpo_stub(loss_type: str, beta: float, label_smoothing: float, gamma: float = 0.5):
    return SimpleNamespace(alpha=0.0, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
                           simpo_gamma=gamma, accelerator=SimpleNamespace(device="cpu"))


@pytest.mark.parametrize("beta,gamma,eps", [(2.0, 1.0, 0.0), (2.5, 1.4, 0.0), (0.1, 0.5, 0.2)])
def test_simpo_equals_trl_cpo(beta, gamma, eps) -> None:
    pytest.importorskip("trl")
    from trl.experimental.cpo import CPOTrainer

    policy_c, policy_r, _, _, len_c, len_r = _logps(1)
    losses, chosen_r, rejected_r = preference_loss(policy_c, policy_r, None, None, len_c, len_r,
                                                   DPOConfig(loss="simpo", beta=beta, simpo_gamma=gamma,
                                                             label_smoothing=eps))
    ref = CPOTrainer.cpo_loss(_cpo_stub("simpo", beta, eps, gamma), policy_c / len_c, policy_r / len_r)
    for ours, theirs in zip((losses, chosen_r, rejected_r), ref):
        torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("eps", [0.1, 0.3])
def test_cdpo_label_smoothing_equals_trl_sigmoid_on_log_ratios(eps) -> None:
    """trl 1.x's DPOTrainer dropped label smoothing from its sigmoid loss; its CPO sigmoid loss keeps cDPO's
    form, which on the log-ratios (policy - reference) is cDPO."""
    pytest.importorskip("trl")
    from trl.experimental.cpo import CPOTrainer

    policy_c, policy_r, ref_c, ref_r, len_c, len_r = _logps(2)
    losses, _, _ = preference_loss(policy_c, policy_r, ref_c, ref_r, len_c, len_r,
                                   DPOConfig(beta=0.3, label_smoothing=eps))
    theirs, _, _ = CPOTrainer.cpo_loss(_cpo_stub("sigmoid", 0.3, eps), policy_c - ref_c, policy_r - ref_r)
    torch.testing.assert_close(losses, theirs)


def test_losses_by_hand() -> None:
    """Independent of trl: h = 2 gives DPO log(1 + e^{-beta h}), IPO (h/len - 1/(2 beta))^2, SimPO at its margin."""
    one = torch.ones(1, dtype=torch.float64)
    c, r, rc, rr, n = -3 * one, -5 * one, 0 * one, 0 * one, 2 * one
    assert preference_loss(c, r, rc, rr, n, n, DPOConfig(beta=0.5))[0].item() == pytest.approx(
        torch.log1p(torch.exp(torch.tensor(-1.0))).item())
    assert preference_loss(c, r, rc, rr, n, n, DPOConfig(loss="ipo", beta=0.5))[0].item() == pytest.approx(0.0)
    simpo = DPOConfig(loss="simpo", beta=2.0, simpo_gamma=2.0)  # beta (avg margin 1) - gamma = 0 -> log 2
    assert preference_loss(c, r, None, None, n, n, simpo)[0].item() == pytest.approx(0.6931471805599453)


def _tiny(seed: int = 0, lora: bool = True):
    torch.manual_seed(seed)
    model = build_model(Config.from_name("tiny-llama", vocab_size=VOCAB, block_size=128))
    base = copy.deepcopy(model)
    if lora:
        apply_lora(model, LoRAConfig(rank=4))
        with torch.no_grad():
            for p in adapter_state(model).values():
                p.add_(torch.randn_like(p) * 0.05)
    return model, base


def _batch(seed: int = 0, B: int = 3) -> dict:
    g = torch.Generator().manual_seed(seed)

    def ids(lo, hi):
        return torch.randint(0, 256, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()

    return collate_pairs([PreferencePair(ids(2, 9), ids(1, 12), ids(1, 12)) for _ in range(B)], pad_id=258)


def test_sequence_logps_equal_full_logits_gather() -> None:
    model, _ = _tiny()
    batch = _batch()
    logits = model(batch["input_ids"]).float()[:, :-1]  # (2B, T-1, vocab), plain forward
    labels = batch["labels"][:, 1:]
    keep = labels != -100
    gathered = logits.log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    expected = (gathered * keep).sum(1)
    torch.testing.assert_close(sequence_logps(model, batch), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sequence_logps(model, batch, average=True), expected / keep.sum(1), rtol=1e-5, atol=1e-5)


def test_fused_logps_gradient_equals_full_logits_gradient() -> None:
    """LoRA freezes lm_head, so the fused per-row path runs; its adapter gradients equal autograd through
    the full logits."""
    model, _ = _tiny()
    batch = _batch(1)
    weights = torch.linspace(-1, 2, batch["input_ids"].shape[0])
    (sequence_logps(model, batch) * weights).sum().backward()
    fused = {n: p.grad.clone() for n, p in adapter_state(model).items()}
    model.zero_grad(set_to_none=True)
    logits = model(batch["input_ids"]).float()[:, :-1]
    labels = batch["labels"][:, 1:]
    lp = logits.log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1) * (labels != -100)
    (lp.sum(1) * weights).sum().backward()
    for name, p in adapter_state(model).items():
        torch.testing.assert_close(fused[name], p.grad, rtol=1e-4, atol=1e-6)


def test_reference_with_adapters_disabled_equals_base_model() -> None:
    model, base = _tiny()
    batch = _batch(2)
    torch.testing.assert_close(reference_logps(model, batch), sequence_logps(base, batch))
    assert not torch.allclose(sequence_logps(model, batch), sequence_logps(base, batch))  # adapter back on after
    merge_lora(model)
    with pytest.raises(ValueError, match="merged"):
        with disabled_adapters(model):
            pass


def test_policy_and_reference_agree_under_bf16_autocast() -> None:
    """At LoRA init (B = 0) policy and reference are one function; under bf16 autocast the training path
    (fused, with grad) and the no-grad reference path both take an fp32 lm_head, so the margin starts at 0."""
    torch.manual_seed(0)
    model = build_model(Config.from_name("tiny-llama", vocab_size=VOCAB, block_size=128))
    apply_lora(model, LoRAConfig(rank=4))
    batch = _batch(5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        policy, reference = sequence_logps(model, batch), reference_logps(model, batch)
    assert policy.requires_grad and policy.dtype == torch.float32
    torch.testing.assert_close(policy.detach(), reference, rtol=0, atol=1e-4)


def test_full_finetune_reference_is_a_frozen_copy() -> None:
    model, base = _tiny(lora=False)
    reference = copy.deepcopy(base).requires_grad_(False)
    objective = PreferenceObjective(DPOConfig(beta=0.1), reference)
    batch = _batch(3)
    loss = objective(model, {**batch, "loss_tokens": 3})
    assert loss.item() == pytest.approx(0.6931471805599453, abs=1e-5)  # policy == reference: -log sigmoid(0)
    loss.backward()
    assert model.lm_head.weight.grad is not None and all(p.grad is None for p in reference.parameters())
    metrics = objective.take_metrics()
    assert metrics["reward_margin"] == pytest.approx(0.0, abs=1e-5) and metrics["preference_accuracy"] == 0.0
    assert objective.take_metrics() == {}  # taken once


@pytest.mark.parametrize("loss", ["sigmoid", "ipo", "simpo"])
def test_precomputed_reference_equals_on_the_fly_and_accumulation_is_exact(loss) -> None:
    from lmforge.training.preferences import precompute_reference

    model, _ = _tiny()
    g = torch.Generator().manual_seed(4)
    pairs = [PreferencePair(torch.randint(0, 256, (4,), generator=g).tolist(),
                            torch.randint(0, 256, (3 + i,), generator=g).tolist(),
                            torch.randint(0, 256, (6 - i,), generator=g).tolist()) for i in range(4)]
    objective = PreferenceObjective(DPOConfig(loss=loss, beta=0.5))
    on_the_fly = collate_pairs(pairs, 258)
    whole = objective(model, {**on_the_fly, "loss_tokens": count_loss_tokens(on_the_fly)})
    precompute_reference(model, pairs, micro_batch=3, pad_id=258)
    pre = collate_pairs(pairs, 258)
    assert ("ref_chosen_logps" in pre) == True  # noqa: E712
    torch.testing.assert_close(objective(model, {**pre, "loss_tokens": 4}), whole, rtol=1e-5, atol=1e-6)
    micro = [collate_pairs(pairs[:1], 258), collate_pairs(pairs[1:], 258)]
    total = sum(count_loss_tokens(b) for b in micro)
    assert total == 4  # pairs, not tokens
    torch.testing.assert_close(sum(objective(model, {**b, "loss_tokens": total}) for b in micro), whole,
                               rtol=1e-5, atol=1e-6)


def _run(out: Path, steps: int, delay: float) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(SCRIPT), str(out), str(steps), str(delay)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_tiny_dpo_run_learns_its_pairs_and_resumes_after_kill(tmp_path) -> None:
    steps = 14
    reference = _run(tmp_path / "ref" / "run", steps, 0.0)
    assert reference.wait(timeout=180) == 0, reference.stderr.read().decode()[-2000:]
    rows = _rows(tmp_path / "ref" / "run")
    first_eval = next(r for r in rows if "eval_loss" in r)
    last = rows[-1]
    assert last["eval_preference_accuracy"] == 1.0 and last["eval_reward_margin"] > 0.5
    assert last["eval_loss"] < 0.5 * 0.6931 and last["eval_loss"] < first_eval["eval_loss"]
    out = tmp_path / "killed" / "run"
    proc = _run(out, steps, 0.1)
    while proc.poll() is None:
        if (out / "metrics.jsonl").exists() and len((out / "metrics.jsonl").read_text().splitlines()) >= 7:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    assert proc.wait(timeout=180) == -signal.SIGKILL
    final = _run(out, steps, 0.0)
    assert final.wait(timeout=180) == 0, final.stderr.read().decode()[-2000:]
    keys = ("step", "loss", "reward_margin", "preference_accuracy")
    assert [[r[k] for k in keys] for r in _rows(out)] == [[r[k] for k in keys] for r in rows]


@pytest.mark.parametrize("adapter,loss", [("lora", "sigmoid"), ("full", "ipo")])
def test_finetune_cli_runs_the_dpo_recipe(tmp_path, adapter, loss) -> None:
    from lmforge import cli
    from lmforge.checkpoint.hf import save_hf

    from .conftest import QA, byte_tokenizer, write_jsonl

    torch.manual_seed(0)
    tiny = save_hf(build_model(Config.from_name("tiny-llama", vocab_size=VOCAB, block_size=128)), tmp_path / "tiny")
    byte_tokenizer().save_hf(tiny)
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": q, "chosen": a, "rejected": a + "?"} for q, a in QA])
    out = tmp_path / "run"
    assert cli.main(["finetune", "--recipe", "dpo", "--model", str(tiny), "--data", str(pairs), "--eval-data",
                     str(pairs), "--out", str(out), "--overrides", "train.max_steps=2", "train.micro_batch=2",
                     "train.grad_accum=1", "train.progress=false", "device=cpu", f"adapter={adapter}",
                     f"dpo.loss={loss}", "dpo.max_prompt_length=48", "dpo.max_length=64"]) == 0
    last = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert {"reward_margin", "preference_accuracy", "eval_reward_margin", "eval_preference_accuracy"} <= set(last)
    assert (out / ("adapter/adapter_model.safetensors" if adapter == "lora" else "model/config.json")).is_file()
