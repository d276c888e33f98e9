"""The pretraining runner: overfits a small text, resumes exactly after kill -9, saves a loadable model,
reports tokens/s and MFU, runs through `lmforge pretrain` and `lmforge finetune --recipe pretrain`."""

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
from safetensors.torch import load_file

from lmforge.training import finetune, pretrain
from lmforge.training.recipe import load_recipe

from .pretrain_script import TEXT, tiny_recipe

SCRIPT = Path(__file__).with_name("pretrain_script.py")


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_overfits_a_small_text_and_saves_a_loadable_model(tmp_path) -> None:
    from lmforge.checkpoint.load import load

    torch.set_num_threads(1)
    recipe = tiny_recipe(tmp_path, tmp_path / "run", 400, lr=1e-2, warmup_steps=10, eval_every=200,
                         save_every=400)
    (tmp_path / "small.txt").write_text(TEXT + "We hold these truths to be self-evident, that all men are created "
                                        "equal.")  # 6 rows of 32 bytes, each seen many times
    recipe.pretrain.sources = {"speech": str(tmp_path / "small.txt")}
    recipe.pretrain.weights = {"speech": 1.0}
    recipe.pretrain.held_out = 0.0
    summary = pretrain.run(recipe)
    rows = _metrics(tmp_path / "run")
    assert rows[0]["loss"] > 4.0 and rows[-1]["loss"] < 0.1, (rows[0]["loss"], rows[-1]["loss"])
    assert all(r["tokens"] == 4 * 32 and r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 for r in rows)
    model, tok = load(summary["model"], device="cpu", dtype=torch.float32)
    last = load_file(str(Path(summary["last"]) / "trainable.safetensors"))
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in last.items() if k in state)
    assert tok.eos_id == 257 and summary["source_epochs"]["speech"] > 1


def _run(out: Path, steps: int, delay: float) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(Path.cwd())}
    return subprocess.Popen([sys.executable, str(SCRIPT), str(out), str(steps), str(delay)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _curve(out: Path) -> list[tuple]:
    return [(r["step"], r["loss"], r["lr"], r["grad_norm"], r.get("eval_loss")) for r in _metrics(out)]


def test_sigkill_then_resume_gives_the_same_curve(tmp_path) -> None:
    steps = 14
    reference = _run(tmp_path / "ref" / "run", steps, 0.0)
    assert reference.wait(timeout=120) == 0, reference.stderr.read().decode()[-2000:]
    rng = random.Random(2)
    out = tmp_path / "killed" / "run"
    codes = []
    for _ in range(2):
        proc = _run(out, steps, 0.15)
        kill_at = rng.randint(3, steps - 3)
        while proc.poll() is None:
            metrics = out / "metrics.jsonl"
            if metrics.exists() and len(metrics.read_text().splitlines()) >= kill_at:
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.005)
        codes.append(proc.wait(timeout=120))
    assert codes.count(-signal.SIGKILL) >= 1, codes
    final = _run(out, steps, 0.0)
    assert final.wait(timeout=120) == 0, final.stderr.read().decode()[-2000:]
    assert _curve(out) == _curve(tmp_path / "ref" / "run")
    assert [r for r in _curve(out) if r[4] is not None]  # the held-out loss was evaluated


def test_cli_and_finetune_dispatch(tmp_path) -> None:
    from lmforge.cli import main
    from lmforge.training.recipe import to_dict

    import yaml

    recipe = tiny_recipe(tmp_path, tmp_path / "cli", 2)
    raw = to_dict(recipe)
    raw["train"]["deterministic"] = False
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(raw))
    assert main(["pretrain", "--recipe", str(tmp_path / "tiny.yaml"), "--overrides", "train.max_steps=3"]) == 0
    assert [r["step"] for r in _metrics(tmp_path / "cli")] == [1, 2, 3]
    assert (tmp_path / "cli" / "model" / "config.json").is_file()
    spec = load_recipe(str(tmp_path / "tiny.yaml"), [f"out_dir={tmp_path / 'ft'}"])
    summary = finetune.run(spec)  # `lmforge finetune --recipe pretrain` takes the same runner
    assert Path(summary["model"]).is_dir() and summary["final_eval_loss"] is not None


def test_packaged_recipe_and_bad_settings() -> None:
    spec = load_recipe("pretrain")
    assert spec.objective == "pretrain" and spec.adapter == "full" and spec.pretrain.preset == "pretrain-llama-30m"
    assert spec.pretrain.weights == {"sotu": 0.4, "python-docs": 0.3, "r-manuals": 0.3}
    with pytest.raises(ValueError, match="held_out"):
        load_recipe("pretrain", ["pretrain.held_out=0.7"])
    with pytest.raises(ValueError, match="set adapter: full"):
        pretrain.init_model(load_recipe("pretrain", ["adapter=lora"]), torch.device("cpu"))


@pytest.mark.real_model
def test_continued_pretraining_from_smollm2(tmp_path) -> None:
    from lmforge import hub

    try:
        hub.resolve("smollm2-135m-instruct")
    except FileNotFoundError:
        pytest.skip("smollm2-135m-instruct is not pulled")
    torch.set_num_threads(1)
    recipe = tiny_recipe(tmp_path, tmp_path / "cont", 2, lr=1e-4, warmup_steps=0, micro_batch=2)
    recipe.pretrain.init, recipe.pretrain.vocab_size = "smollm2-135m-instruct", None
    summary = pretrain.run(recipe)
    rows = _metrics(tmp_path / "cont")
    assert rows[0]["loss"] < 5.0  # a trained model: far below ln(49152) = 10.8 of a random one
    assert summary["parameters"] > 100e6 and (Path(summary["model"]) / "model.safetensors").is_file()


@pytest.mark.parametrize("tied", [True, False])
def test_fused_cross_entropy_with_a_trained_head_equals_torch(tied) -> None:
    """Pretraining trains the lm_head: the fused loss gives the loss and the gradients of plain cross-entropy."""
    import torch.nn.functional as F

    from lmforge.config import Config
    from lmforge.model.transformer import build_model
    from lmforge.training.objectives import cross_entropy

    torch.manual_seed(0)
    model = build_model(Config.from_name("tiny-llama", tie_embeddings=tied, vocab_size=300)).double()
    hidden = torch.randn(cross_entropy.LOGIT_CHUNK + 37, 64, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 300, (hidden.shape[0],))
    fused = cross_entropy.token_losses(model, hidden, targets) / 7
    fused.backward()
    grads = (hidden.grad.clone(), model.lm_head.weight.grad.clone())
    hidden.grad, model.lm_head.weight.grad = None, None
    plain = F.cross_entropy(model.lm_head(hidden), targets, reduction="sum") / 7
    plain.backward()
    torch.testing.assert_close(fused.detach(), plain.detach().float(), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(grads[0], hidden.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grads[1], model.lm_head.weight.grad, rtol=1e-5, atol=1e-7)
