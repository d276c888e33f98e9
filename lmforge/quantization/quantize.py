"""Quantize a Transformer's linears by method name, and save/load the result without recalibrating.

One dispatcher over the techniques (int8 dynamic/static, int4 round-to-nearest, NF4, GPTQ, AWQ),
and one on-disk layout: a directory with `model.safetensors` (the portable quantized tensors, never a
kernel's packing) and `quantization.json` (the QuantConfig, the model Config and the kind of every
quantized module). Loading builds the model on the meta device, swaps in empty quantized modules of
the recorded kinds and adopts the tensors with `load_state_dict(assign=True)` (gpt-fast's pattern).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from lmforge.atomic import atomic_write, atomic_write_text
from lmforge.checkpoint.errors import CheckpointError
from lmforge.config import Config
from lmforge.model.transformer import Transformer
from lmforge.quantization.int4 import GROUP_SIZES, Int4Linear, check_group_size
from lmforge.quantization.int8 import (Int8DynamicLinear, Int8Embedding, Int8StaticLinear, MinMaxObserver,
                                       ObserverMethod)
from lmforge.model.nf4 import BLOCK_SIZE as NF4_BLOCK_SIZE
from lmforge.model.nf4 import NF4Linear
from lmforge.model.surgery import release_freed_memory, replace_linear

Method = Literal["int8-dynamic", "int8-static", "int4", "nf4", "gptq", "awq"]
CALIBRATED: tuple[str, ...] = ("int8-static", "gptq", "awq")
SMOOTHED: tuple[str, ...] = ("int8-dynamic", "int8-static")  # methods that apply SmoothQuant (smooth_alpha)
CPU_KERNELS: tuple[str, ...] = ("int8-dynamic", "int8-static", "int4", "gptq", "awq")
FORMAT_VERSION = 1
WEIGHTS_FILE, META_FILE = "model.safetensors", "quantization.json"


@dataclass
class QuantConfig:
    """How to quantize: the method and its knobs (group size, symmetry, calibration size, GPTQ damping)."""

    method: Method = "int8-dynamic"
    group_size: int = 128  # int4/gptq/awq: input columns per (scale, zero)
    symmetric: bool = False  # int4/gptq/awq: zero fixed at 0, scale = absmax / 7
    include_lm_head: bool = True  # quantize lm_head too (a tied embedding keeps its float weight)
    act_order: bool = False  # gptq: process columns by decreasing Hessian diagonal
    damp: float = 0.01  # gptq: fraction of the mean Hessian diagonal added for stability
    calibration_samples: int = 128  # calibration batches used (int8-static, gptq, awq)
    seq_len: int = 512  # tokens kept per calibration batch
    observer: ObserverMethod = "minmax"  # int8-static activation range: running min/max or percentile
    percentile: float = 99.99  # int8-static with observer="percentile"
    embedding: Literal["float", "int8"] = "int8"  # the token table once a quantized lm_head is untied from it
    smooth_alpha: float | None = 0.5  # int8 methods: SmoothQuant migration strength; None: no smoothing

    def __post_init__(self) -> None:
        if self.method not in Method.__args__:
            raise ValueError(f"method={self.method!r} is not one of {Method.__args__}")
        if self.group_size not in GROUP_SIZES:
            raise ValueError(f"group_size={self.group_size} is not supported; use one of {GROUP_SIZES}")
        if not 0.0 <= self.damp <= 1.0:
            raise ValueError(f"damp={self.damp} must be in [0, 1] (a fraction of mean(diag H)); 0.01 is usual")
        for name in ("calibration_samples", "seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1")
        if self.observer not in ObserverMethod.__args__:
            raise ValueError(f"observer={self.observer!r} is not one of {ObserverMethod.__args__}")
        if self.embedding not in ("float", "int8"):
            raise ValueError(f"embedding={self.embedding!r} must be 'float' or 'int8'")
        if not 50.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile={self.percentile} must be in (50, 100]")
        if self.smooth_alpha is not None and not 0.0 <= self.smooth_alpha <= 1.0:
            raise ValueError(f"smooth_alpha={self.smooth_alpha} must be in [0, 1], or None to turn SmoothQuant off")

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> QuantConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown quantization preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown QuantConfig fields {unknown}; known fields are {sorted(known)}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


PRESETS: dict[str, dict[str, Any]] = {
    "int8-dynamic": dict(method="int8-dynamic"),
    "int8-static": dict(method="int8-static"),
    "int4-g128": dict(method="int4", group_size=128),
    "int4-g64": dict(method="int4", group_size=64),
    "int4-g32": dict(method="int4", group_size=32),
    "nf4": dict(method="nf4"),
    "gptq-g128": dict(method="gptq", group_size=128),
    "gptq-g64": dict(method="gptq", group_size=64),
    "awq-g128": dict(method="awq", group_size=128),
    "awq-g64": dict(method="awq", group_size=64),
}


def needs_calibration(config: QuantConfig) -> bool:
    """Whether quantize_model needs calibration batches for this config (int8 ones do when smoothing)."""
    return config.method in CALIBRATED or (config.method in SMOOTHED and config.smooth_alpha is not None)


def target_names(model: nn.Module, config: QuantConfig) -> list[str]:
    """Qualified names of the nn.Linear modules the config quantizes (lm_head only with include_lm_head)."""
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and (config.include_lm_head or name != "lm_head")]


def quantize_model(model: Transformer, config: QuantConfig, calibration: list[torch.Tensor] | None = None,
                   progress: bool = True) -> Transformer:
    """Swap the model's linears for quantized ones in place and return it.

    Args:
        model: a float Transformer (on the CPU for every method but nf4).
        config: the method and its settings.
        calibration: list of (1, T) LongTensor token batches; required for int8-static, gptq and awq, and for
            int8-dynamic unless smooth_alpha is None.
        progress: show a tqdm bar over the swapped modules.
    """
    if needs_calibration(config):
        calibration = _check_calibration(calibration, config)
    device = next(model.parameters()).device
    if config.method in CPU_KERNELS and device.type != "cpu":
        raise ValueError(f"method={config.method!r} runs on CPU kernels (fbgemm / aten int4); the model is on "
                         f"{device}; move it to the CPU first, or use method='nf4'")
    model.eval()
    if config.method == "gptq":
        from lmforge.quantization.gptq import quantize_gptq
        quantize_gptq(model, calibration, config)
    elif config.method == "awq":
        from lmforge.quantization.awq import quantize_awq
        quantize_awq(model, calibration, config)
    else:
        _swap_linears(model, config, calibration, progress)
    if config.embedding == "int8" and not isinstance(model.lm_head, nn.Linear):
        model.model.embed_tokens = Int8Embedding.from_embedding(model.model.embed_tokens)  # no longer tied
    release_freed_memory()  # the float weights just replaced
    return model


def _swap_linears(model: Transformer, config: QuantConfig, calibration: list[torch.Tensor] | None,
                  progress: bool) -> None:
    """int8 / int4 round-to-nearest / nf4: each target linear replaced by its quantized twin."""
    ordered = target_names(model, config)
    names = set(ordered)
    if config.method == "int4":
        for name in ordered:
            _check_int4_shape(name, model.get_submodule(name), config.group_size)
    if config.method in SMOOTHED and config.smooth_alpha is not None:
        from lmforge.quantization.smoothquant import smooth_model
        smooth_model(model, calibration, config.smooth_alpha, include_lm_head=config.include_lm_head)
    observers = _calibrate(model, ordered, calibration, config, progress) if config.method == "int8-static" else {}
    bar = tqdm(total=len(names), desc=f"quantize {config.method}", disable=not progress)

    def make(name: str, linear: nn.Linear) -> nn.Module | None:
        if name not in names:
            return None
        bar.update()
        return _quantized(linear, config, observers.get(name))

    with torch.no_grad():
        replace_linear(model, make)
    bar.close()


def _quantized(linear: nn.Linear, config: QuantConfig, observer: MinMaxObserver | None) -> nn.Module:
    if config.method == "int8-dynamic":
        return Int8DynamicLinear.from_linear(linear)
    if config.method == "int8-static":
        return Int8StaticLinear.from_linear(linear, observer)
    if config.method == "int4":
        return Int4Linear.from_linear(linear, config.group_size, config.symmetric)
    return NF4Linear(linear.weight.detach(), linear.bias, block_size=NF4_BLOCK_SIZE, double_quant=True)


def _check_int4_shape(name: str, linear: nn.Linear, group_size: int) -> None:
    """Fail before any layer is swapped when one cannot hold int4 codes (odd width)."""
    check_group_size(linear.in_features, group_size)
    if linear.in_features % 2:
        raise ValueError(f"{name}: in_features={linear.in_features} is odd; int4 packs two codes per byte")


def _check_calibration(calibration: list[torch.Tensor] | None, config: QuantConfig) -> list[torch.Tensor]:
    """The first calibration_samples batches, each cut to seq_len tokens; ValueError when unusable."""
    if not calibration:
        smoothing = " (SmoothQuant's activation statistics; or smooth_alpha=None)" if config.method in SMOOTHED else ""
        raise ValueError(f"method={config.method!r} needs calibration data{smoothing}: pass calibration=[LongTensor "
                         f"(1, T), ...] token batches (e.g. {config.calibration_samples} samples of {config.seq_len} "
                         f"tokens)")
    for i, batch in enumerate(calibration):
        if not isinstance(batch, torch.Tensor) or batch.dim() != 2 or batch.dtype != torch.long:
            got = f"{tuple(batch.shape)} {batch.dtype}" if isinstance(batch, torch.Tensor) else type(batch).__name__
            raise ValueError(f"calibration[{i}] must be a (1, T) LongTensor of token ids, got {got}")
    return [batch[:, :config.seq_len] for batch in calibration[:config.calibration_samples]]


@torch.no_grad()
def _calibrate(model: Transformer, names: list[str], calibration: list[torch.Tensor], config: QuantConfig,
               progress: bool) -> dict[str, MinMaxObserver]:
    """Run the float model over the calibration batches, recording each target linear's input range."""
    observers = {name: MinMaxObserver(config.observer, config.percentile) for name in names}
    hooks = [model.get_submodule(name).register_forward_pre_hook(lambda m, args, o=obs: o.update(args[0]))
             for name, obs in observers.items()]
    device = next(model.parameters()).device
    try:
        for batch in tqdm(calibration, desc="calibrate", disable=not progress):
            model(batch.to(device))
    finally:
        for hook in hooks:
            hook.remove()
    return observers


def module_record(module: nn.Module) -> dict[str, Any] | None:
    """What load_quantized needs to rebuild a quantized module empty: its kind and shape parameters."""
    if isinstance(module, Int4Linear):
        return {"kind": "int4", "group_size": module.group_size}
    if isinstance(module, Int8StaticLinear):
        return {"kind": "int8-static"}
    if isinstance(module, Int8DynamicLinear):
        return {"kind": "int8-dynamic"}
    if isinstance(module, NF4Linear):
        return {"kind": "nf4", "block_size": module.block_size}
    if isinstance(module, Int8Embedding):
        return {"kind": "int8-embedding"}
    return None


def _empty_module(record: dict[str, Any], linear: nn.Module) -> nn.Module:
    """A quantized module of the recorded kind on the meta device, shaped like `linear` (or the embedding)."""
    kind = record.get("kind")
    if kind == "int8-embedding":
        assert isinstance(linear, nn.Embedding), f"an int8-embedding record names a {type(linear).__name__}"
        return Int8Embedding(linear.num_embeddings, linear.embedding_dim, device="meta")
    assert isinstance(linear, nn.Linear), f"a {kind} record names a {type(linear).__name__}, not a Linear"
    k, n, bias = linear.in_features, linear.out_features, linear.bias is not None
    if kind == "int4":
        return Int4Linear(k, n, int(record["group_size"]), bias, device="meta")
    if kind == "int8-dynamic":
        return Int8DynamicLinear(k, n, bias, device="meta")
    if kind == "int8-static":
        return Int8StaticLinear(k, n, bias, device="meta")
    if kind == "nf4":
        return NF4Linear(torch.empty(n, k, device="meta"), torch.empty(n, device="meta") if bias else None,
                         block_size=int(record["block_size"]), double_quant=True)
    raise ValueError(f"unknown quantized module kind {kind!r}")


def save_quantized(model: Transformer, config: QuantConfig, path: str | Path) -> Path:
    """Write `path/model.safetensors` and `path/quantization.json`; returns the directory."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    modules = {name: rec for name, m in model.named_modules() if (rec := module_record(m)) is not None}
    if not modules:
        raise ValueError("the model has no quantized modules; run quantize_model(model, config) first")
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if isinstance(model.lm_head, nn.Linear) and model.lm_head.weight is model.model.embed_tokens.weight:
        state.pop("lm_head.weight")  # tied: stored once, re-tied at load
    meta = {"format_version": FORMAT_VERSION, "quant_config": config.to_dict(),
            "model_config": model.config.to_dict(), "modules": modules}
    atomic_write(path / WEIGHTS_FILE, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))
    atomic_write_text(path / META_FILE, json.dumps(meta, indent=2))
    return path


def _read_meta(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such quantized-model directory; write one with save_quantized()")
    for name in (META_FILE, WEIGHTS_FILE):
        if not (path / name).is_file():
            raise CheckpointError(f"{path}: {name} is missing; is this a directory written by save_quantized()?")
    try:
        meta = json.loads((path / META_FILE).read_text())
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"format_version {meta.get('format_version')!r}, expected {FORMAT_VERSION}")
        meta["quant_config"] = QuantConfig.from_dict(meta["quant_config"])
        meta["model_config"] = Config.from_dict(meta["model_config"])
        if not isinstance(meta["modules"], dict):
            raise ValueError("'modules' is not a mapping")
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{path / META_FILE} is corrupt: {err}; re-save the model with save_quantized()") \
            from err
    return meta


def _read_weights(path: Path, device: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path / WEIGHTS_FILE, device=device)
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path / WEIGHTS_FILE} is corrupt or truncated: {err}; re-save the model") from err


def load_quantized(path: str | Path, device: str = "cpu", attn_impl: str | None = None) -> Transformer:
    """The quantized Transformer saved at `path` (no recalibration), in eval mode."""
    path = Path(path)
    meta = _read_meta(path)
    if attn_impl:
        meta["model_config"].attn_impl = attn_impl
    kinds = {rec.get("kind") for rec in meta["modules"].values() if isinstance(rec, dict)}
    if torch.device(device).type != "cpu" and kinds & {"int4", "int8-dynamic", "int8-static"}:
        raise ValueError(f"device={device!r}: int4/int8 modules have kernels only on the CPU; load with "
                         f"device='cpu' (only nf4 models run elsewhere)")
    with torch.device("meta"):
        model = Transformer(meta["model_config"])
    for name, record in meta["modules"].items():
        try:
            linear = model.get_submodule(name)
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, _empty_module(record, linear))
        except (AttributeError, AssertionError, ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f"{path / META_FILE}: module {name!r} cannot be rebuilt: {err}") from err
    _assign(model, _read_weights(path, device), path)
    return model.eval()


def _assign(model: Transformer, state: dict[str, torch.Tensor], path: Path) -> None:
    """Adopt `state` (checked against the rebuilt model's keys and shapes), re-tying a float lm_head."""
    expected = model.state_dict()
    tied = model.config.tie_embeddings and isinstance(model.lm_head, nn.Linear)
    if tied:
        expected.pop("lm_head.weight", None)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{path / WEIGHTS_FILE}: tensors do not match {META_FILE}: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    for name, tensor in state.items():
        want = expected[name]
        codes_mismatch = not want.dtype.is_floating_point and tensor.dtype != want.dtype  # float params may be bf16
        if tuple(tensor.shape) != tuple(want.shape) or codes_mismatch:
            raise CheckpointError(f"{path / WEIGHTS_FILE}: {name} is {tuple(tensor.shape)} {tensor.dtype}, expected "
                                  f"{tuple(want.shape)} {want.dtype}")
    model.load_state_dict(state, strict=False, assign=True)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight


def model_nbytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers as stored (a tied tensor counted once; kernel packings not counted)."""
    seen: set[int] = set()
    total = 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total
