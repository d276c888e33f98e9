"""The training loop: accumulation equals a big batch, packing isolates examples, kill and resume."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lmforge.config import Config
from lmforge.model.transformer import build_model
from lmforge.training.data import Batches, build_rows, collate
from lmforge.training.lora import LoRAConfig, adapter_state, apply_lora
from lmforge.training.objectives import count_loss_tokens, sft_loss
from lmforge.training.optim import AdamW8bit, dequantize_state, quantize_state, state_bytes
from lmforge.training.schedules import lr_at
from lmforge.training.trainer import TrainConfig, train

from .conftest import VOCAB

SCRIPT = Path(__file__).with_name("train_script.py")


def _model(dora: bool = False):
    torch.manual_seed(0)
    model = build_model(Config.from_name("tiny-llama", vocab_size=VOCAB, block_size=512))
    apply_lora(model, LoRAConfig(rank=4, dora=dora))
    with torch.no_grad():
        for name, p in adapter_state(model).items():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def _grads(model, batches):
    total = sum(count_loss_tokens(b) for b in batches)
    loss = 0.0
    for b in batches:
        part = sft_loss(model, {**b, "loss_tokens": total})
        part.backward()
        loss += float(part.detach())
    grads = {n: p.grad.clone() for n, p in adapter_state(model).items()}
    model.zero_grad(set_to_none=True)
    return loss, grads


@pytest.mark.parametrize("checkpointing", [False, True])
def test_accumulating_4x1_equals_batch_4(tokenizer, alpaca_file, checkpointing) -> None:
    rows = build_rows(alpaca_file, tokenizer, "alpaca", 256, packing=False)[:4]
    model = _model(dora=True)
    model.gradient_checkpointing = checkpointing
    big_loss, big = _grads(model, [collate(rows, tokenizer.pad_id)])
    small_loss, small = _grads(model, [collate([r], tokenizer.pad_id) for r in rows])
    assert small_loss == pytest.approx(big_loss, rel=1e-5)
    for name in big:
        torch.testing.assert_close(small[name], big[name], atol=1e-6, rtol=1e-4)


def test_packed_rows_equal_separate_examples(tokenizer, alpaca_file) -> None:
    model = _model()
    separate = build_rows(alpaca_file, tokenizer, "alpaca", 600, packing=False)[:4]
    packed = [sum(separate[:2], []), sum(separate[2:], [])]
    with torch.no_grad():
        a = sft_loss(model, collate(separate, tokenizer.pad_id))
        b = sft_loss(model, collate(packed, tokenizer.pad_id))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_schedule_warmup_then_cosine_and_linear() -> None:
    assert lr_at(0, 1.0, 4, 20) == 0.25 and lr_at(3, 1.0, 4, 20) == 1.0
    assert lr_at(4, 1.0, 4, 20) == pytest.approx(1.0) and lr_at(20, 1.0, 4, 20) == pytest.approx(0.1)
    assert lr_at(12, 1.0, 4, 20, "linear", 0.0) == pytest.approx(0.5)


def test_adamw8bit_tracks_adamw_with_a_quarter_of_the_state() -> None:
    torch.manual_seed(0)
    target = torch.randn(64, 64)
    a = torch.nn.Parameter(torch.zeros(64, 64))
    b = torch.nn.Parameter(torch.zeros(64, 64))
    ref, ours = torch.optim.AdamW([a], lr=1e-2, weight_decay=0.0), AdamW8bit([b], lr=1e-2)
    for _ in range(100):
        for p, opt in ((a, ref), (b, ours)):
            loss = ((p - target) ** 2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
    assert ((b - target) ** 2).mean() < 1.5 * ((a - target) ** 2).mean() + 1e-3
    assert state_bytes(ours) < 0.3 * state_bytes(ref)
    x = torch.randn(1000) * torch.logspace(-6, 0, 1000)
    codes, absmax = quantize_state(x, signed=True)
    assert (dequantize_state(codes, absmax, x, True) - x).abs().max() < 0.02 * x.abs().max()


def test_train_writes_metrics_checkpoints_adapter_and_plot(tokenizer, alpaca_file, tmp_path) -> None:
    rows = build_rows(alpaca_file, tokenizer, "alpaca", 256, packing=False)
    model = _model()
    cfg = TrainConfig(max_steps=8, micro_batch=2, lr=5e-3, warmup_steps=2, eval_every=4, save_every=4,
                      average_last=2, progress=False)
    summary = train(model, sft_loss, Batches(rows, 2, tokenizer.pad_id), cfg, tmp_path / "run",
                    eval_batches=Batches(rows[:4], 2, tokenizer.pad_id).all())
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 9))
    assert metrics[-1]["eval_loss"] < metrics[3]["eval_loss"] < 6.0
    assert Path(summary["best"]).name == "step-0000008" and summary["plot"].endswith("loss.png")
    assert set(summary["averaged"]) == set(adapter_state(model))
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == \
        ["index.json", "step-0000004", "step-0000008"]


def _run(out: Path, steps: int, delay: float) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(Path.cwd())}
    return subprocess.Popen([sys.executable, str(SCRIPT), str(out), str(steps), str(delay)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _curve(out: Path) -> list[tuple]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["lr"], r["grad_norm"], r.get("eval_loss")) for r in rows]


def _complete_checkpoints(root: Path) -> None:
    index = json.loads((root / "index.json").read_text())
    for name in index["history"]:
        assert sorted(p.name for p in (root / name).iterdir()) == \
            ["optimizer.safetensors", "state.json", "trainable.safetensors"]


def test_sigkill_at_random_steps_then_resume_gives_the_same_curve(tmp_path) -> None:
    steps = 16
    reference = _run(tmp_path / "ref" / "run", steps, 0.0)
    assert reference.wait(timeout=120) == 0, reference.stderr.read().decode()[-2000:]
    rng = random.Random(1)
    out = tmp_path / "killed" / "run"
    codes = []
    for _ in range(3):
        proc = _run(out, steps, 0.05)
        kill_at = rng.randint(2, steps - 2)
        while proc.poll() is None:
            metrics = out / "metrics.jsonl"
            if metrics.exists() and len(metrics.read_text().splitlines()) >= kill_at:
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.005)
        codes.append(proc.wait(timeout=120))
        if (out / "checkpoints" / "index.json").exists():
            _complete_checkpoints(out / "checkpoints")
    assert codes.count(-signal.SIGKILL) >= 2, codes  # killed mid-run, not after finishing
    final = _run(out, steps, 0.0)
    assert final.wait(timeout=120) == 0, final.stderr.read().decode()[-2000:]
    assert _curve(out) == _curve(tmp_path / "ref" / "run")


def test_fused_linear_cross_entropy_equals_torch(monkeypatch) -> None:
    from lmforge.training.objectives import cross_entropy as objectives

    monkeypatch.setattr(objectives, "LOGIT_CHUNK", 7)  # several chunks, one ragged
    h = torch.randn(20, 16, requires_grad=True)
    W, t = torch.randn(50, 16), torch.randint(0, 50, (20,))
    fused = objectives._FusedLinearCrossEntropy.apply(h, W, t) * 0.5
    fused.backward()
    grad, h.grad = h.grad.clone(), None
    reference = torch.nn.functional.cross_entropy(h @ W.T, t, reduction="sum") * 0.5
    reference.backward()
    torch.testing.assert_close(fused, reference)
    torch.testing.assert_close(grad, h.grad)
