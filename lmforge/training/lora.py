"""LoRA, DoRA and QLoRA layers by module swap: the frozen base keeps its `weight`/`bias` keys.

LoRA (Hu et al. 2021, https://arxiv.org/abs/2106.09685): y = W x + (alpha / r) B A x, with A
(r, in) Kaiming-uniform and B (out, r) zero, so training starts from the base model.
DoRA (Liu et al. 2024, https://arxiv.org/abs/2402.09353): W' = m (W + s B A) / ||W + s B A||_row,
the norm detached as in the paper's section 4.3 (and PEFT), m initialised to ||W||_row.
QLoRA (Dettmers et al. 2023): the same adapter over an NF4 base dequantized on the fly.
Submodule and parameter names equal PEFT's (lora_A, lora_B, lora_magnitude_vector).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Iterator, Literal

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.model.linear import Linear
from lmforge.model.nf4 import BLOCK_SIZE, NF4Linear
from lmforge.model.surgery import release_freed_memory, replace_linear

ALL_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoRAConfig:
    """Adapter shape: rank, alpha, dropout, which linears; DoRA and NF4 base switches."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(ALL_LINEARS))
    dora: bool = False
    quantize: Literal["none", "nf4"] = "none"
    nf4_block_size: int = BLOCK_SIZE
    double_quant: bool = True

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"lora rank={self.rank} must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora dropout={self.dropout} must be in [0, 1)")
        if self.quantize not in ("none", "nf4"):
            raise ValueError(f"lora quantize={self.quantize!r} must be 'none' or 'nf4'")
        self.target_modules = list(self.target_modules)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank (and with DoRA, magnitude) update."""

    def __init__(self, base: nn.Linear, config: LoRAConfig) -> None:
        super().__init__()
        self.out_features, self.in_features = base.weight.shape
        self._init_base(base, config)
        self.scaling, self.dora, self.merged = config.scaling, config.dora, False
        self.disabled = False  # disabled_adapters(): the layer computes its frozen base only
        self.lora_dropout = nn.Dropout(config.dropout) if config.dropout else nn.Identity()
        kw = dict(bias=False, device=base.weight.device, dtype=base.weight.dtype)  # a bf16 base gets bf16 adapters
        self.lora_A = nn.Linear(self.in_features, config.rank, **kw)
        self.lora_B = nn.Linear(config.rank, self.out_features, **kw)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's default init
        nn.init.zeros_(self.lora_B.weight)
        if self.dora:
            self.lora_magnitude_vector = nn.Parameter(self.weight.detach().norm(dim=1))  # (out,)

    def _init_base(self, base: nn.Linear, config: LoRAConfig) -> None:
        """Adopt the base weight as is (storage and strides kept), frozen."""
        self.weight = base.weight
        self.weight.requires_grad_(False)
        self.bias = base.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)

    def base_linear(self, x: torch.Tensor) -> torch.Tensor:
        """W x without the bias."""
        return F.linear(x, self.weight)

    def delta_weight(self) -> torch.Tensor:
        """s B A, (out, in)."""
        return self.scaling * (self.lora_B.weight @ self.lora_A.weight)

    def dora_scale(self) -> torch.Tensor:
        """m / ||W + s B A||_row, (out,), the norm detached (DoRA section 4.3)."""
        norm = (self.weight + self.delta_weight().detach()).norm(dim=1).detach()
        return self.lora_magnitude_vector / norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., in) -> (..., out)."""
        if self.disabled:
            base = self.base_linear(x)
            return base + self.bias if self.bias is not None else base
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        h = self.lora_dropout(x)
        lora = self.lora_B(self.lora_A(h) * self.scaling)  # scale the (.., r) tensor, not the (.., out) one
        base = self.base_linear(x)
        if self.dora:
            scale = self.dora_scale()
            if h is x:  # no dropout: m/||.|| (W x + s B A x)
                base = scale * (base + lora)
            else:  # PEFT's form with dropout: W x + (scale - 1) W drop(x) + scale s B A drop(x)
                base = base + (scale - 1) * self.base_linear(h) + scale * lora
        else:
            base = base + lora
        return base + self.bias if self.bias is not None else base

    def merged_weight(self) -> torch.Tensor:
        """The weight of one plain linear that computes this layer (eval mode)."""
        w = self.weight.detach() + self.delta_weight().detach()
        if self.dora:
            w = w * (self.lora_magnitude_vector.detach() / w.norm(dim=1))[:, None]
        return w

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into `weight` in place (strides kept); `unmerge` undoes it."""
        if self.merged:
            return
        if self.dora:
            combined = self.weight + self.delta_weight()
            self._merge_norm = combined.norm(dim=1)
            self.weight.copy_(combined * (self.lora_magnitude_vector / self._merge_norm)[:, None])
        else:
            self.weight.add_(self.delta_weight())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the adapter from `weight` again."""
        if not self.merged:
            return
        if self.dora:
            self.weight.mul_((self._merge_norm / self.lora_magnitude_vector)[:, None])
        self.weight.sub_(self.delta_weight())
        self.merged = False


class QLoRALinear(LoRALinear):
    """LoRA over an NF4 base (QLoRA): `weight` dequantizes on access, nothing float is stored."""

    def _init_base(self, base: nn.Linear, config: LoRAConfig) -> None:
        self.base = NF4Linear(base.weight, None, config.nf4_block_size, config.double_quant)
        self.bias = base.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)

    @property
    def weight(self) -> torch.Tensor:
        return self.base.dequantize()

    def base_linear(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x)

    def merge(self) -> None:
        raise ValueError("a QLoRA layer cannot merge into its NF4 base in place; export the merged model "
                         "with `merge_and_unload` (it dequantizes, then merges)")

    unmerge = merge


def apply_lora(model: nn.Module, config: LoRAConfig) -> nn.Module:
    """Freeze the model and swap its target linears for LoRA/DoRA/QLoRA layers (in place)."""
    for p in model.parameters():
        p.requires_grad_(False)
    cls = QLoRALinear if config.quantize == "nf4" else LoRALinear
    targets = set(config.target_modules)
    found: list[str] = []

    def make(name: str, linear: nn.Linear) -> nn.Module | None:
        if name.rsplit(".", 1)[-1] not in targets:
            return None
        found.append(name)
        return cls(linear, config)

    replace_linear(model, make)
    if config.quantize == "nf4":
        compact_embeddings(model)
        release_freed_memory()  # the fp32 weights just replaced
    if not found:
        raise ValueError(f"no linear layer matches target_modules={config.target_modules}; "
                         f"the model's linears are named like {ALL_LINEARS}")
    model.lora_config = config
    return model


class _UpcastMatmul(torch.autograd.Function):
    """y = x W^T with a low-precision frozen W upcast in forward and again in backward (none kept)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.weight = weight
        return x @ weight.to(x.dtype).t()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad @ ctx.weight.to(grad.dtype), None


class FrozenEmbedding(nn.Module):
    """A frozen token embedding stored in bf16 (buffer `weight`, same key), read as float."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight.detach().to(torch.bfloat16))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight).float()


class FrozenLMHead(nn.Module):
    """The tied output projection over a FrozenEmbedding's bf16 table."""

    def __init__(self, embedding: FrozenEmbedding) -> None:
        super().__init__()
        self.table = [embedding]  # a list, so the tied tensor is not registered twice

    @property
    def weight(self) -> torch.Tensor:
        return self.table[0].weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _UpcastMatmul.apply(x, self.weight)


def compact_embeddings(model: nn.Module) -> None:
    """QLoRA: keep the frozen tied embedding/lm_head in bf16, as the paper keeps non-quantized
    parts in bf16 (NF4 for embeddings would cost accuracy; fp32 would be 4x the NF4 body)."""
    backbone = getattr(model, "model", None)
    if backbone is None or not getattr(getattr(model, "config", None), "tie_embeddings", False):
        return
    embedding = FrozenEmbedding(backbone.embed_tokens.weight)
    backbone.embed_tokens = embedding
    model.lm_head = FrozenLMHead(embedding)


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable adapter tensors under our names (…q_proj.lora_A.weight, …)."""
    return {name: p for name, p in model.named_parameters() if "lora_" in name}


@contextmanager
def disabled_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block every LoRA/DoRA/QLoRA layer computes its frozen base alone, so the model is the
    base model (DPO's and PPO's reference) with no second copy in memory (PEFT's `disable_adapter`)."""
    layers = lora_layers(model)
    merged = [name for name, layer in layers.items() if layer.merged]
    if merged:
        raise ValueError(f"LoRA layer {merged[0]} is merged into its base weight; unmerge_lora(model) "
                         "before disabling the adapters")
    for layer in layers.values():
        layer.disabled = True
    try:
        yield model
    finally:
        for layer in layers.values():
            layer.disabled = False


def merge_lora(model: nn.Module) -> None:
    for layer in lora_layers(model).values():
        layer.merge()


def unmerge_lora(model: nn.Module) -> None:
    for layer in lora_layers(model).values():
        layer.unmerge()


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Replace every adapter layer by a plain (lmforge) Linear holding the merged weight (for export)."""
    def unwrap(module: nn.Module, prefix: str = "") -> None:
        for name, child in module.named_children():
            if isinstance(child, LoRALinear):
                linear = Linear(child.in_features, child.out_features, bias=child.bias is not None)
                linear.weight = nn.Parameter(child.merged_weight() if not child.merged else child.weight.detach(),
                                             requires_grad=False)
                if child.bias is not None:
                    linear.bias = nn.Parameter(child.bias.detach(), requires_grad=False)
                setattr(module, name, linear)
            else:
                unwrap(child)

    unwrap(model)
    if isinstance(getattr(getattr(model, "model", None), "embed_tokens", None), FrozenEmbedding):
        table = model.model.embed_tokens.weight.float()
        model.model.embed_tokens = nn.Embedding.from_pretrained(table, freeze=True)
        model.lm_head = Linear(table.shape[1], table.shape[0], bias=False)
        model.lm_head.weight = model.model.embed_tokens.weight
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model


def config_dict(config: LoRAConfig) -> dict:
    return asdict(config)
