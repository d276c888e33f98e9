"""Bottleneck adapters (Houlsby et al. 2019, https://arxiv.org/abs/1902.00751), by module swap.

After a block's attention and/or MLP sublayer, before its residual add, h <- h + s * W_up f(W_down h + b_down)
+ s * b_up: a down-projection to `size` dimensions, a nonlinearity, an up-projection and a skip connection
(the paper's figure 2). W_up and b_up start at zero, so training starts from the base model exactly (the
paper's near-identity initialisation, made exact); W_down ~ N(0, 1e-2) truncated at two standard
deviations, the paper's initialisation.

The sublayer's output is its last linear's output (o_proj, down_proj), so the adapter rides on that
linear: BottleneckLinear keeps its `weight`/`bias` keys (as LoRALinear does) and adds `adapter_down` and
`adapter_up`. PEFT has no bottleneck adapter; we save in PEFT's shape, under peft_type "BOTTLENECK" marked
`"library": "lmforge"` in adapter_config.json (docs/training.md describes the layout).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.atomic import atomic_write, atomic_write_json
from lmforge.model.surgery import replace_linear

PEFT_TYPE = "BOTTLENECK"
SUBLAYER_OUTPUTS = {"attention": "o_proj", "mlp": "down_proj"}  # the linear that ends each sublayer
ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}
INIT_STD = 1e-2  # Houlsby et al.'s initialisation: weights ~ N(0, 1e-2), truncated at 2 std


@dataclass
class BottleneckConfig:
    """Adapter width, where the adapters go, their nonlinearity and output scale."""

    size: int = 64  # bottleneck dimension m (Houlsby et al. sweep 8-256)
    placement: Literal["both", "attention", "mlp"] = "both"  # both: Houlsby; mlp alone: Pfeiffer et al. 2021
    activation: Literal["relu", "gelu", "silu", "tanh"] = "silu"
    scaling: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"bottleneck size={self.size} must be >= 1")
        if self.placement not in ("both", "attention", "mlp"):
            raise ValueError(f"bottleneck placement={self.placement!r} must be 'both', 'attention' or 'mlp'")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"bottleneck activation={self.activation!r} must be one of {sorted(ACTIVATIONS)}")

    @property
    def targets(self) -> list[str]:
        """The linears the adapters follow (o_proj ends attention, down_proj the MLP)."""
        kinds = ("attention", "mlp") if self.placement == "both" else (self.placement,)
        return [SUBLAYER_OUTPUTS[k] for k in kinds]


class BottleneckLinear(nn.Module):
    """A frozen linear followed by a trainable bottleneck adapter with a skip connection."""

    def __init__(self, base: nn.Linear, config: BottleneckConfig, generator: torch.Generator) -> None:
        super().__init__()
        self.out_features, self.in_features = base.weight.shape
        self.weight, self.bias = base.weight, base.bias  # adopted as they are (same keys)
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.adapter_down = nn.Linear(self.out_features, config.size, **kw)
        self.adapter_up = nn.Linear(config.size, self.out_features, **kw)
        with torch.no_grad():
            nn.init.trunc_normal_(self.adapter_down.weight, std=INIT_STD, a=-2 * INIT_STD, b=2 * INIT_STD,
                                  generator=generator)
            self.adapter_down.bias.zero_()
            self.adapter_up.weight.zero_()
            self.adapter_up.bias.zero_()
        self.activation, self.scaling = ACTIVATIONS[config.activation], config.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., in) -> (..., out): h = W x + b, then h + s * up(f(down(h)))."""
        h = F.linear(x, self.weight, self.bias)
        return h + self.scaling * self.adapter_up(self.activation(self.adapter_down(h)))


def apply_bottleneck(model: nn.Module, config: BottleneckConfig) -> nn.Module:
    """Freeze the model and put an adapter after each targeted sublayer (in place)."""
    for p in model.parameters():
        p.requires_grad_(False)
    targets = set(config.targets)
    generator = torch.Generator().manual_seed(config.seed)
    found: list[str] = []

    def make(name: str, linear: nn.Linear) -> nn.Module | None:
        if name.rsplit(".", 1)[-1] not in targets:
            return None
        found.append(name)
        return BottleneckLinear(linear, config, generator)

    replace_linear(model, make)
    if not found:
        raise ValueError(f"no linear named {sorted(targets)} in the model; bottleneck adapters follow a block's "
                         "o_proj (attention) and down_proj (MLP)")
    model.bottleneck_config = config
    return model


def bottleneck_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors under our names (…o_proj.adapter_down.weight, …)."""
    return {name: p for name, p in model.named_parameters() if ".adapter_down." in name or ".adapter_up." in name}


def bottleneck_config_dict(config: BottleneckConfig, base_model: str | None = None) -> dict:
    """adapter_config.json: PEFT's common fields, then ours; `library` says whose format it is."""
    return {"peft_type": PEFT_TYPE, "library": "lmforge", "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model, "bottleneck_size": config.size, "placement": config.placement,
            "target_modules": config.targets, "non_linearity": config.activation, "scaling": config.scaling,
            "inference_mode": True}


def save_bottleneck(model: nn.Module, path: str | Path, base_model: str | None = None) -> Path:
    """Write the adapters as adapter_config.json + adapter_model.safetensors (keys under base_model.model.)."""
    from lmforge.training.peft_layout import CONFIG_FILE, PEFT_PREFIX, WEIGHTS_FILE
    from safetensors.torch import save_file

    config: BottleneckConfig | None = getattr(model, "bottleneck_config", None)
    if config is None:
        raise ValueError("the model has no bottleneck adapters; call apply_bottleneck first")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {PEFT_PREFIX + k: v.detach().contiguous().cpu() for k, v in bottleneck_state(model).items()}
    atomic_write(path / WEIGHTS_FILE, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    atomic_write_json(path / CONFIG_FILE, bottleneck_config_dict(config, base_model))
    return path


def load_bottleneck(model: nn.Module, path: str | Path, cfg: dict) -> nn.Module:
    """Apply the adapters saved at `path` (`cfg`: its adapter_config.json); every key must match."""
    from lmforge.training.peft_layout import PEFT_PREFIX, WEIGHTS_FILE, copy_adapter_tensors
    from safetensors.torch import load_file

    config = BottleneckConfig(size=int(cfg["bottleneck_size"]), placement=cfg.get("placement", "both"),
                              activation=cfg.get("non_linearity", "silu"), scaling=float(cfg.get("scaling", 1.0)))
    apply_bottleneck(model, config)
    state = {k.removeprefix(PEFT_PREFIX): v for k, v in load_file(str(Path(path) / WEIGHTS_FILE)).items()}
    copy_adapter_tensors(bottleneck_state(model), state, path, "bottleneck adapters do",
                         "load them onto the model they were trained for")
    return model
