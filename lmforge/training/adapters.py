"""Adapters in the PEFT layout: adapter_config.json + adapter_model.safetensors, PEFT key names.

`load_adapter` and `save_adapter` take LoRA/DoRA/QLoRA here, prefixes (prefix.py) and bottleneck
adapters (bottleneck.py) by peft_type.

`peft.PeftModel.from_pretrained(hf_model, path)` loads what `save_adapter` writes; our names
are already PEFT's after the `base_model.model.` prefix (model.layers.0.self_attn.q_proj.lora_A.weight).
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from lmforge.atomic import atomic_write, atomic_write_json
from lmforge.training.lora import LoRAConfig, adapter_state, apply_lora
from lmforge.training.peft_layout import CONFIG_FILE, PEFT_PREFIX, WEIGHTS_FILE, copy_adapter_tensors



def peft_config(config: LoRAConfig, base_model: str | None = None) -> dict:
    """The adapter_config.json PEFT reads (LoraConfig fields; ours kept under `lmforge`)."""
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": config.rank, "lora_alpha": config.alpha, "lora_dropout": config.dropout,
        "target_modules": sorted(config.target_modules), "use_dora": config.dora, "use_rslora": False,
        "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True, "modules_to_save": None,
        "inference_mode": True,
    }


def _base_metadata(config: LoRAConfig) -> dict[str, str]:
    """How the base was quantized in training, kept in the safetensors header (PEFT ignores it)."""
    return {"format": "pt", "lmforge.quantize": config.quantize,
            "lmforge.nf4_block_size": str(config.nf4_block_size), "lmforge.double_quant": str(config.double_quant)}


def save_adapter(model: nn.Module, path: str | Path, base_model: str | None = None) -> Path:
    """Write the model's adapter (atomically, file by file) in the PEFT layout: LoRA/DoRA/QLoRA, a prefix
    (training/prefix.py) or bottleneck adapters (training/bottleneck.py), whichever the model carries."""
    if hasattr(model, "prefix_encoder"):
        from lmforge.training.prefix import save_prefix

        return save_prefix(model, path, base_model)
    if hasattr(model, "bottleneck_config"):
        from lmforge.training.bottleneck import save_bottleneck

        return save_bottleneck(model, path, base_model)
    config: LoRAConfig | None = getattr(model, "lora_config", None)
    if config is None:
        raise ValueError("the model has no adapter; call apply_lora, apply_prefix or apply_bottleneck first")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {PEFT_PREFIX + k: v.detach().contiguous().cpu() for k, v in adapter_state(model).items()}
    atomic_write(path / WEIGHTS_FILE, lambda tmp: save_file(tensors, str(tmp), metadata=_base_metadata(config)))
    atomic_write_json(path / CONFIG_FILE, peft_config(config, base_model))
    return path


def read_adapter_config(path: str | Path) -> LoRAConfig:
    """A LoRAConfig from a PEFT adapter_config.json (ours or PEFT's own)."""
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        raise ValueError(f"{file} not found; an adapter folder holds {CONFIG_FILE} and {WEIGHTS_FILE}")
    cfg = json.loads(file.read_text())
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{file}: peft_type {cfg['peft_type']!r} is not supported (LORA only)")
    targets = cfg.get("target_modules") or []
    if isinstance(targets, str):
        raise ValueError(f"{file}: target_modules as a regex ({targets!r}) is not supported; list the names")
    weights = Path(path) / WEIGHTS_FILE
    meta = {}
    if weights.is_file():
        with safe_open(str(weights), "pt") as f:
            meta = f.metadata() or {}
    return LoRAConfig(rank=cfg["r"], alpha=cfg["lora_alpha"], dropout=cfg.get("lora_dropout", 0.0),
                      target_modules=targets, dora=bool(cfg.get("use_dora")),
                      quantize=meta.get("lmforge.quantize", "none"),
                      nf4_block_size=int(meta.get("lmforge.nf4_block_size", 64)),
                      double_quant=meta.get("lmforge.double_quant", "True") == "True")


def read_peft_type(path: str | Path) -> tuple[str, dict]:
    """(peft_type, the whole adapter_config.json) of an adapter folder."""
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        raise ValueError(f"{file} not found; an adapter folder holds {CONFIG_FILE} and {WEIGHTS_FILE}")
    cfg = json.loads(file.read_text())
    return str(cfg.get("peft_type", "LORA")), cfg


def load_adapter(model: nn.Module, path: str | Path, quantize: str | None = None) -> nn.Module:
    """Apply the adapter saved at `path` to `model` (in place), by its peft_type: LORA, PREFIX_TUNING or
    lmforge's BOTTLENECK; every key must match."""
    peft_type, cfg = read_peft_type(path)
    if peft_type == "PREFIX_TUNING":
        from lmforge.training.prefix import load_prefix

        return load_prefix(model, path, cfg)
    if peft_type == "BOTTLENECK":
        from lmforge.training.bottleneck import load_bottleneck

        return load_bottleneck(model, path, cfg)
    if peft_type != "LORA":
        raise ValueError(f"{Path(path) / CONFIG_FILE}: peft_type {peft_type!r} is not supported; lmforge loads "
                         "LORA (with DoRA), PREFIX_TUNING and BOTTLENECK adapters")
    config = read_adapter_config(path)
    if quantize is not None:
        config.quantize = quantize
    apply_lora(model, config)
    raw = load_file(str(Path(path) / WEIGHTS_FILE))
    state = {_our_name(k): v for k, v in raw.items()}
    copy_adapter_tensors(adapter_state(model), state, path, "adapter does",
                         "was it trained on another architecture?")
    return model


def _our_name(key: str) -> str:
    """PEFT key -> ours: drop the prefix and any adapter name (`.default`)."""
    key = key.removeprefix(PEFT_PREFIX)
    return key.replace(".default.", ".").removesuffix(".default")
