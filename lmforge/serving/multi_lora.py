"""Multi-LoRA serving: many LoRA adapters over one base model in one batch (as S-LoRA and Punica
serve them). Each targeted linear computes the base product once for every packed token, then the
low-rank updates of all loaded adapters in two small products: the adapters' A matrices stacked
(sum of ranks x in) and B matrices side by side (out x sum of ranks), with a per-step row mask that
keeps, for each token, only its own adapter's columns (scaled by its alpha / r) -- so a step costs
the same few operations per layer however many adapters share the batch. Adapters (PEFT layout:
adapter_config.json + adapter_model.safetensors) load and unload at run time.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

PEFT_PREFIX = "base_model.model."


class MultiLoRALinear(nn.Module):
    """A frozen linear (the base module kept whole) plus the per-row LoRA updates of every adapter."""

    def __init__(self, base: nn.Module, registry: "AdapterRegistry") -> None:
        super().__init__()
        self.base, self.registry = base, registry
        self.adapters: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # name -> (A (r, in), B (out, r))
        self.A_cat: torch.Tensor | None = None  # (R, in): every adapter's A in the registry's column order
        self.B_cat: torch.Tensor | None = None  # (out, R)

    @property
    def decode_inner(self) -> nn.Module:
        """The base linear, for the fused decode step (generation/fused_decode.py): the engine runs that step
        only when no row of the batch uses an adapter, where this layer computes the base alone."""
        return self.base

    def stack(self, columns: dict[str, tuple[int, int, float]], width: int) -> None:
        """Rebuild A_cat/B_cat for the registry's column layout (zeros where this layer lacks an adapter)."""
        if not self.adapters:
            self.A_cat = self.B_cat = None
            return
        out_features, in_features = _shape(self.base)
        some = next(iter(self.adapters.values()))[0]
        A_cat = some.new_zeros(width, in_features)
        B_cat = some.new_zeros(out_features, width)
        for name, (A, B) in self.adapters.items():
            start, rank, _ = columns[name]
            A_cat[start:start + rank], B_cat[:, start:start + rank] = A, B
        self.A_cat, self.B_cat = A_cat, B_cat

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        mask = self.registry.mask  # (N, R): each packed token's adapter columns hold its scaling, others 0
        if mask is None or self.A_cat is None:
            return y
        flat_x = x.reshape(-1, x.shape[-1])
        low = (flat_x @ self.A_cat.t()) * mask  # (N, R): every adapter's x A^T, kept only where the row uses it
        return torch.addmm(y.reshape(-1, y.shape[-1]), low.to(y.dtype), self.B_cat.t().to(y.dtype)).view(y.shape)


def same_model(a: str, b: str) -> bool:
    """Whether two model references (registry names, paths) name the same model: equal, or resolving
    to the same file or folder through the registry (lmforge.hub)."""
    if a == b or Path(a).name == Path(b).name:
        return True
    from lmforge import hub

    try:
        return hub.resolve(a).resolve() == hub.resolve(b).resolve()
    except (FileNotFoundError, OSError):
        return False


def _shape(module: nn.Module) -> tuple[int, int] | None:
    """(out, in) of a float, GGUF-block or int4 linear; None for anything else."""
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return module.out_features, module.in_features
    weight = getattr(module, "weight", None)
    return tuple(weight.shape) if isinstance(weight, torch.Tensor) and weight.dim() == 2 else None


class AdapterRegistry:
    """The adapters a server holds, and which packed rows of the current step use which one."""

    def __init__(self, model: nn.Module, base_name: str) -> None:
        self.model, self.base_name = model, base_name
        self.mask: torch.Tensor | None = None  # this step's (N, R) row mask; None when no row uses an adapter
        self.columns: dict[str, tuple[int, int, float]] = {}  # adapter -> (first column, rank, alpha / r)
        self.names: dict[str, str] = {}  # adapter name -> its folder
        self.lock = threading.Lock()

    def _layer(self, name: str) -> MultiLoRALinear:
        """The MultiLoRALinear at module path `name`, swapping the plain linear in on first use."""
        parent_name, _, child = name.rpartition(".")
        parent = self.model.get_submodule(parent_name) if parent_name else self.model
        module = getattr(parent, child)
        if not isinstance(module, MultiLoRALinear):
            if _shape(module) is None:
                raise ValueError(f"{name} is not a linear layer")
            module = MultiLoRALinear(module, self)
            setattr(parent, child, module)
        return module

    def load(self, name: str, path: str | Path) -> None:
        """Load the PEFT LoRA adapter at `path` as `name`; refused when it was trained on another base
        model (its base_model_name_or_path or its tensor shapes), uses DoRA, or the name is taken."""
        path = Path(path)
        if not name or ":" in name:
            raise ValueError(f"adapter name {name!r} must be non-empty without ':'")
        if name in self.names:
            raise ValueError(f"adapter {name!r} is already loaded (from {self.names[name]}); unload it first")
        config_file, weights_file = path / "adapter_config.json", path / "adapter_model.safetensors"
        if not config_file.is_file() or not weights_file.is_file():
            raise ValueError(f"{path} is not a LoRA adapter folder (adapter_config.json + adapter_model.safetensors)")
        config = json.loads(config_file.read_text())
        if config.get("peft_type", "LORA") != "LORA" or config.get("use_dora"):
            raise ValueError(f"{path}: only plain LoRA adapters are served together (peft_type "
                             f"{config.get('peft_type')!r}, use_dora={config.get('use_dora', False)})")
        base = config.get("base_model_name_or_path")
        if base and not same_model(str(base), self.base_name):
            raise ValueError(f"{path}: the adapter was trained on {base!r}, this server runs {self.base_name!r}")
        scaling = float(config["lora_alpha"]) / float(config["r"])
        pairs = self._pairs(load_file(str(weights_file)), path)
        dtype = torch.float32 if next(self.model.parameters()).dtype == torch.float32 else \
            next(self.model.parameters()).dtype
        with self.lock:
            for module_name, (A, B) in pairs.items():
                layer = self._layer(module_name)
                out_features, in_features = _shape(layer.base)
                if A.shape[1] != in_features or B.shape[0] != out_features:
                    raise ValueError(f"{path}: {module_name} has lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)}, "
                                     f"which do not fit this model's ({out_features}, {in_features}) weight: the "
                                     "adapter is for another base model")
            for module_name, (A, B) in pairs.items():
                self._layer(module_name).adapters[name] = (A.to(dtype), B.to(dtype))
            self.names[name] = str(path)
            rank = next(iter(pairs.values()))[0].shape[0]
            width = sum(r for _, r, _ in self.columns.values())
            self.columns[name] = (width, rank, scaling)
            self._restack()

    def _restack(self) -> None:
        width = sum(r for _, r, _ in self.columns.values())
        for module in self.model.modules():
            if isinstance(module, MultiLoRALinear):
                module.stack(self.columns, width)

    def _pairs(self, tensors: dict[str, torch.Tensor], path: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """module path -> (A, B) from PEFT keys (…q_proj.lora_A.weight, …q_proj.lora_B.weight)."""
        out: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            key = key.removeprefix(PEFT_PREFIX).replace(".default.", ".")
            for part in ("lora_A", "lora_B"):
                marker = f".{part}.weight"
                if key.endswith(marker):
                    out.setdefault(key[:-len(marker)], {})[part] = value
        broken = [k for k, v in out.items() if len(v) != 2]
        if not out or broken:
            raise ValueError(f"{path}: no complete lora_A/lora_B pairs" + (f" (incomplete: {broken[:3]})" if broken else ""))
        for module_name in out:
            try:
                self.model.get_submodule(module_name)
            except AttributeError:
                raise ValueError(f"{path}: module {module_name} is not in this model: the adapter is for "
                                 "another architecture") from None
        return {k: (v["lora_A"], v["lora_B"]) for k, v in out.items()}

    def unload(self, name: str) -> None:
        if name not in self.names:
            raise KeyError(f"adapter {name!r} is not loaded; loaded: {sorted(self.names)}")
        with self.lock:
            for module in self.model.modules():
                if isinstance(module, MultiLoRALinear):
                    module.adapters.pop(name, None)
            del self.names[name]
            kept, start = {}, 0
            for other, (_, rank, scaling) in self.columns.items():
                if other != name:
                    kept[other], start = (start, rank, scaling), start + rank
            self.columns = kept
            self._restack()

    def set_rows(self, adapters: list[str | None], counts: list[int], device: torch.device) -> None:
        """Before a step: the (N, R) row mask from each sequence's adapter and its packed token count."""
        if all(a is None for a in adapters):
            self.mask = None
            return
        width = sum(r for _, r, _ in self.columns.values())
        dtype = next(self.model.parameters()).dtype
        mask = torch.zeros(sum(counts), width, dtype=dtype if dtype.is_floating_point else torch.float32)
        position = 0
        for adapter, n in zip(adapters, counts):
            if adapter in self.columns:  # an adapter unloaded mid-request: its rows finish on the base
                start, rank, scaling = self.columns[adapter]
                mask[position:position + n, start:start + rank] = scaling
            position += n
        self.mask = mask.to(device)


def attach(engine, base_name: str) -> AdapterRegistry:
    """An AdapterRegistry over the engine's model, used by its runner from the next step on."""
    registry = AdapterRegistry(engine.model, base_name)
    engine.runner.adapters = registry
    return registry
