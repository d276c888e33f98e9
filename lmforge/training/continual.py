"""Continual learning as recipe options (section `continual`): start task B from task A's adapter, add
the EWC penalty (objectives/ewc.py) and/or replay task A's rows (replay.py). Every option off: a no-op.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lmforge.training.data import Batches, build_rows
from lmforge.training.objectives.ewc import anchor, estimate_fisher, load_ewc, save_ewc, with_ewc
from lmforge.training.replay import ReplayBatches


@dataclass
class ContinualConfig:
    """EWC and replay against a previous task; `init_adapter` continues from that task's LoRA adapter."""

    init_adapter: str | None = None  # task A's adapter dir: task B's LoRA starts there (same params as the Fisher)
    ewc_lambda: float = 0.0  # 0 = no EWC
    fisher: str | None = None  # safetensors of Fisher + anchor; read if it exists, else estimated and written
    previous_data: str | None = None  # task A's JSONL, for estimating the Fisher
    fisher_batches: int = 32
    replay_data: str | None = None  # task A's JSONL whose rows are replayed
    replay_fraction: float = 0.0  # share of each micro-batch's rows drawn from replay_data

    def __post_init__(self) -> None:
        if self.ewc_lambda < 0:
            raise ValueError(f"continual.ewc_lambda={self.ewc_lambda} must be >= 0")
        if not 0.0 <= self.replay_fraction < 1.0:
            raise ValueError(f"continual.replay_fraction={self.replay_fraction} must lie in [0, 1)")
        if self.ewc_lambda > 0 and not (self.fisher and Path(self.fisher).is_file()) and not self.previous_data:
            raise ValueError("continual.ewc_lambda > 0 needs continual.fisher (an existing file) or "
                             "continual.previous_data (task A's JSONL) to estimate it from")
        if self.replay_fraction > 0 and not self.replay_data:
            raise ValueError("continual.replay_fraction > 0 needs continual.replay_data (task A's JSONL)")

    @property
    def active(self) -> bool:
        return bool(self.init_adapter or self.ewc_lambda or self.replay_fraction)


PRESETS: dict[str, dict] = {  # measured in bench/bench_continual.py
    "ewc": dict(ewc_lambda=1e6, fisher_batches=8),  # 1e4 removed 4% of the forgetting, 1e6 72%
    "replay": dict(replay_fraction=0.25),
}


def _load_init_adapter(model, path: str) -> None:
    """Copy task A's adapter tensors into the model's (already applied) adapter."""
    from safetensors.torch import load_file

    from lmforge.training.adapters import WEIGHTS_FILE, _our_name
    from lmforge.training.lora import adapter_state

    state = {_our_name(k): v for k, v in load_file(str(Path(path) / WEIGHTS_FILE)).items()}
    params = adapter_state(model)
    if set(state) != set(params):
        raise ValueError(f"{path}: adapter does not fit this recipe's LoRA (keys differ: "
                         f"{sorted(set(state) ^ set(params))[:3]}); use task A's lora section")
    for name, p in params.items():
        p.data.copy_(state[name])


def apply_continual(cfg: ContinualConfig, model, tokenizer, data: Batches, objective, template: str,
                    max_length: int, packing: bool, seed: int = 0):
    """(data, objective) for task B: init from task A's adapter, then the Fisher at theta* = that
    adapter, then the penalty and/or the replay mixer."""
    if not cfg.active:
        return data, objective
    if cfg.init_adapter:
        _load_init_adapter(model, cfg.init_adapter)
    if cfg.ewc_lambda > 0:
        if cfg.fisher and Path(cfg.fisher).is_file():
            fisher, theta_star = load_ewc(cfg.fisher, model)
        else:
            old = build_rows(cfg.previous_data, tokenizer, template, max_length, packing)
            batches = Batches(old, data.micro_batch, data.pad_id, seed=seed).all()
            fisher, theta_star = estimate_fisher(model, objective, batches, cfg.fisher_batches), anchor(model)
            if cfg.fisher:
                save_ewc(cfg.fisher, fisher, theta_star)
        objective = with_ewc(objective, fisher, theta_star, cfg.ewc_lambda)
    if cfg.replay_fraction > 0:
        old = build_rows(cfg.replay_data, tokenizer, template, max_length, packing)
        data = ReplayBatches(data.rows, old, data.micro_batch, data.pad_id, cfg.replay_fraction, seed=seed)
    return data, objective
