"""Fine-tuning recipes: YAML files in the package, one dataclass per section, dotted overrides.

`lmforge finetune --recipe lora` reads lmforge/training/recipes/lora.yaml; any field can be
overridden as `section.field=value` (`train.max_steps=50 lora.rank=16 data.packing=false`).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from lmforge.training.continual import ContinualConfig
from lmforge.training.bottleneck import BottleneckConfig
from lmforge.training.lora import LoRAConfig
from lmforge.training.prefix import PrefixConfig
from lmforge.training.objectives.dpo import DPOConfig
from lmforge.training.mixture import PretrainConfig
from lmforge.training.objectives.reward import RewardConfig
from lmforge.training.objectives.distill import DistillConfig
from lmforge.training.objectives.ppo import PPOConfig
from lmforge.training.trainer import TrainConfig

RECIPE_DIR = Path(__file__).with_name("recipes")


@dataclass
class DataConfig:
    """Where the SFT data is and how it becomes tokens."""

    train: str | None = None  # JSONL; None -> the Python FAQ set (`lmforge data python-faq`)
    eval: str | None = None  # held-out JSONL; None -> the FAQ held-out split when train is None
    template: Literal["alpaca", "chat"] = "chat"
    max_length: int = 256
    packing: bool = True

    def __post_init__(self) -> None:
        if self.template not in ("alpaca", "chat"):
            raise ValueError(f"data.template={self.template!r} must be 'alpaca' or 'chat'")
        if self.max_length < 8:
            raise ValueError(f"data.max_length={self.max_length} is too small")


@dataclass
class Recipe:
    """A whole training run: model, objective, what is trained, data, loop, output folder.

    `objective` picks the runner (finetune.RUNNERS: sft, dpo, distill, ...); `adapter` what is
    trained: lora (also DoRA/QLoRA through the lora section), prefix, bottleneck, or full (every weight).
    A section of another objective or adapter may stay in the YAML at its defaults; it is simply not read.
    """

    model: str = "smollm2-135m-instruct"
    out_dir: str = "runs/finetune"
    device: str = "auto"  # auto -> cuda when present, else cpu
    objective: str = "sft"
    adapter: Literal["lora", "prefix", "bottleneck", "full"] = "lora"
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    prefix: PrefixConfig = field(default_factory=PrefixConfig)
    bottleneck: BottleneckConfig = field(default_factory=BottleneckConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    continual: ContinualConfig = field(default_factory=ContinualConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)


# section name -> its config dataclass; each is also a Recipe field of the same name
SECTIONS = {"data": DataConfig, "lora": LoRAConfig, "train": TrainConfig}
SECTIONS.update(prefix=PrefixConfig, bottleneck=BottleneckConfig)
SECTIONS["dpo"] = DPOConfig
SECTIONS["pretrain"] = PretrainConfig
SECTIONS.update(distill=DistillConfig, continual=ContinualConfig)
SECTIONS.update(reward=RewardConfig, ppo=PPOConfig)


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def _section(cls, values: dict, where: str):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{where}: unknown fields {unknown}; known: {sorted(known)}")
    return cls(**{k: _coerce(cls, k, v, where) for k, v in values.items()})


def _coerce(cls, name: str, value: Any, where: str) -> Any:
    """Check a YAML value against the dataclass field's type (ints widen to floats)."""
    base = typing.get_type_hints(cls)[name]
    if typing.get_origin(base) in (typing.Union, types.UnionType):  # Optional[X]
        if value is None:
            return None
        base = next(a for a in typing.get_args(base) if a is not type(None))
    if typing.get_origin(base) is Literal:
        if value not in typing.get_args(base):
            raise ValueError(f"{where}.{name}={value!r} must be one of {typing.get_args(base)}")
        return value
    if base is float and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:
            return float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
        except ValueError:
            raise ValueError(f"{where}.{name}={value!r} must be float") from None
    origin = typing.get_origin(base) or base
    if origin in (int, float, str, bool, list) and not isinstance(value, origin):
        raise ValueError(f"{where}.{name}={value!r} must be {getattr(origin, '__name__', origin)}")
    if origin is int and isinstance(value, bool):
        raise ValueError(f"{where}.{name}={value!r} must be int")
    return value


def from_dict(raw: dict, where: str = "recipe") -> Recipe:
    """A validated Recipe from nested dicts (unknown keys and wrong types are errors)."""
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: a recipe is a mapping of sections, got {type(raw).__name__}")
    top = {k: v for k, v in raw.items() if k not in SECTIONS}
    sections = {k: _section(SECTIONS[k], raw.get(k) or {}, f"{where}: {k}") for k in SECTIONS}
    return Recipe(**{k: _coerce(Recipe, k, v, where) for k, v in _known_top(top, where).items()}, **sections)


def _known_top(top: dict, where: str) -> dict:
    known = {"model", "out_dir", "device", "objective", "adapter"}
    unknown = sorted(set(top) - known)
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; top-level keys are {sorted(known | set(SECTIONS))}")
    return top


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """`a.b=value` strings applied to nested dicts; values parse as YAML (1e-4, true, [q_proj])."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} must look like section.field=value (e.g. train.max_steps=50)")
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {part} is not a section")
        node[leaf] = yaml.safe_load(text) if text else None
    return raw


def load_recipe(name_or_path: str, overrides: list[str] | None = None) -> Recipe:
    """A packaged recipe by name (lora, dora, qlora) or a YAML path, with overrides applied."""
    path = Path(name_or_path)
    if not path.suffix:
        path = RECIPE_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ValueError(f"recipe {name_or_path!r} not found; packaged recipes: {recipe_names()} or a .yaml path")
    raw = yaml.safe_load(path.read_text()) or {}
    return from_dict(apply_overrides(raw, list(overrides or [])), where=str(path.name))


def to_dict(recipe: Recipe) -> dict:
    return dataclasses.asdict(recipe)
