"""Training MoE models: expert usage in the metrics rows and its plot; padding left out of the
balancing statistics; dense models' rows unchanged."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.config import Config
from lmforge.model.transformer import build_model
from lmforge.training.data import Batches, Example, collate
from lmforge.training.objectives import pretrain_loss, router_loss
from lmforge.training.plot import plot_expert_load
from lmforge.training.trainer import TrainConfig, train

B, T = 2, 16


def _rows(n: int = 8, length: int = T) -> list[list[Example]]:
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, 256, (length,), generator=g).tolist() for _ in range(n)]
    return [[Example(x, x)] for x in ids]


def _run(config: Config, tmp_path) -> tuple[list[dict], dict]:
    model = build_model(config)
    cfg = TrainConfig(max_steps=3, micro_batch=B, eval_every=0, save_every=0, progress=False, precision="fp32")
    summary = train(model, pretrain_loss, Batches(_rows(), B, 0), cfg, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    return rows, summary


def test_metrics_rows_carry_each_layers_expert_shares(tmp_path):
    rows, summary = _run(Config.from_name("tiny-mixtral", capacity_factor=1.0), tmp_path)
    assert len(rows) == 3
    for row in rows:
        assert sorted(row["expert_usage"]) == ["0", "1"]
        for shares in row["expert_usage"].values():
            counts = [s * B * T * 2 for s in shares]  # this step's B * T tokens, top-2 each
            assert len(shares) == 4 and sum(shares) == pytest.approx(1.0, abs=1e-4)
            assert counts == pytest.approx([round(c) for c in counts], abs=1e-3)
        assert 0.0 <= row["expert_dropped"] < 1.0
    assert summary["expert_plot"].endswith("expert_load.png")
    assert (tmp_path / "expert_load.png").stat().st_size > 1000


def test_dense_rows_have_no_expert_fields(tmp_path):
    rows, summary = _run(Config.from_name("tiny-llama"), tmp_path)
    assert all("expert_usage" not in row for row in rows) and "expert_plot" not in summary
    assert plot_expert_load({"dense": rows}, tmp_path / "none.png") is None


def test_padding_is_left_out_of_the_balancing_loss():
    transformers_mixtral = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
    model = build_model(Config.from_name("tiny-mixtral", router_aux_loss_coef=1.0)).train()
    batch = collate([_rows(1, 10)[0], _rows(1, 16)[0]], pad_id=0)
    assert batch["valid"].sum() == 26
    with torch.no_grad():
        model(batch["input_ids"], positions=batch["positions"])
    logits = tuple(m.mlp.router_logits for m in model.model.layers)
    got = router_loss(model, batch, label_tokens=1)
    want = transformers_mixtral.load_balancing_loss_func(logits, 4, 2, attention_mask=batch["valid"].long())
    torch.testing.assert_close(got, want)
    unmasked = transformers_mixtral.load_balancing_loss_func(logits, 4, 2)
    assert abs(float(want) - float(unmasked)) > 1e-4  # the padding would have counted
