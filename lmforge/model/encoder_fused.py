"""Packed encoder inference on lmforge's fused CPU kernels: real tokens only, no padding, no mask.

A batch of sequences is one (N, n_embd) block of rows, N the number of real tokens, with
cu_seqlens marking where each sequence starts (FlashAttention's varlen layout). Each block then
runs as four linears without bias (q/k/v fused into one) and passes of kernels/encoder.cpp around
them: attention per (sequence, head) reading q/k/v and their bias from the fused product, bias +
residual + LayerNorm, bias + GELU. torch would spend extra memory passes on each bias, the padding
and the mask. The linears are MKL's fp32 GEMMs (precision "fp32"), or on CPUs with AMX three bf16
products per GEMM on the tile unit with fp32 accumulation ("bf16x3", kernels/encoder_gemm.h: about
2x faster, within ~5e-6 relative of fp32), the GELU then applied while the down projection's input
is split. Inference only; equal to Encoder.forward with a padding mask to float rounding, or to
~1e-4 with bf16x3 (tests/model/test_encoder.py). `sentence_embeddings` picks this path when the
kernels are built and the model is fp32 on the CPU, else the padded forward.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from lmforge.kernels import encoder as kernels
from lmforge.model.encoder import Encoder, EncoderLayer, Pooling, sentence_embedding


Precision = Literal["fp32", "bf16x3"]
# tokens per forward: MiniLM's (tokens, 1536) MLP activation stays at 24 MiB, under glibc's 32 MiB mmap
# threshold, so it is reused from the heap instead of freshly mapped (and page-faulted) for every layer
MAX_TOKENS = 4096
_PREPARED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {precision: (signature, weights)}


@dataclass
class Packed:
    """Sequences laid end to end: ids, positions and token types (N,); cu_seqlens (B + 1) row offsets."""

    ids: torch.Tensor
    positions: torch.Tensor
    token_types: torch.Tensor | None
    cu_seqlens: torch.Tensor

    @property
    def lengths(self) -> torch.Tensor:
        return self.cu_seqlens[1:] - self.cu_seqlens[:-1]


def pack(seqs: list[list[int]], token_types: list[list[int]] | None = None) -> Packed:
    """Token id lists (each non-empty) as one Packed batch; positions restart at 0 in each sequence."""
    if not seqs or any(len(s) == 0 for s in seqs):
        raise ValueError("pack takes one or more non-empty token id lists (a tokenizer adds [CLS]/[SEP] even to '')")
    lengths = torch.tensor([len(s) for s in seqs])
    cu = torch.zeros(len(seqs) + 1, dtype=torch.long)
    cu[1:] = lengths.cumsum(0)
    ids = torch.tensor([t for s in seqs for t in s], dtype=torch.long)
    starts = torch.repeat_interleave(cu[:-1], lengths)
    positions = torch.arange(len(ids)) - starts
    types = torch.tensor([t for s in token_types for t in s], dtype=torch.long) if token_types is not None else None
    return Packed(ids, positions, types, cu)


def usable(model: Encoder) -> bool:
    """Whether the fused path takes this model: built kernels, fp32 weights on the CPU."""
    weight = model.embeddings.word_embeddings.weight
    return weight.device.type == "cpu" and weight.dtype == torch.float32 and kernels.extension() is not None


def _embed(model: Encoder, packed: Packed) -> torch.Tensor:
    """LayerNorm(word + token type + position) of the packed rows (N, n_embd)."""
    emb = model.embeddings
    x = emb.word_embeddings.weight[packed.ids]
    if emb.token_type_embeddings is not None:
        types = emb.token_type_embeddings.weight
        x = x + (types[packed.token_types] if packed.token_types is not None else types[0])
    x = x + emb.position_embeddings.weight[packed.positions]
    return F.layer_norm(x, emb.LayerNorm.normalized_shape, emb.LayerNorm.weight, emb.LayerNorm.bias, emb.LayerNorm.eps)


@dataclass
class Weight:
    """A linear weight as the fused path multiplies it: fp32 (N, K) on MKL, or bf16x3 tiles on AMX."""

    tensor: torch.Tensor
    n: int
    tiles: bool

    def __call__(self, ext, x: torch.Tensor) -> torch.Tensor:
        """x (rows, K) @ W^T -> (rows, N), without bias."""
        return ext.linear_bf16x3(x, self.tensor, self.n) if self.tiles else torch.mm(x, self.tensor.t())


def _weight(ext, w: torch.Tensor, precision: Precision) -> Weight:
    n, k = w.shape
    if precision == "bf16x3" and n % 32 == 0 and k % 32 == 0:
        return Weight(ext.pack_bf16x3(w.detach().contiguous()), n, True)
    return Weight(w.detach().contiguous(), n, False)


def _prepare(ext, model: Encoder, precision: Precision) -> list[dict]:
    """Per block: q/k/v fused into one weight and bias, every weight in its precision's layout; built once
    per model and precision, rebuilt when a parameter changes (its version counter moves)."""
    signature = tuple((p.data_ptr(), p._version) for p in model.encoder.parameters())
    cached = _PREPARED.setdefault(model, {}).get(precision)
    if cached is not None and cached[0] == signature:
        return cached[1]
    layers = []
    for layer in model.encoder.layer:
        attn = layer.attention.self
        qkv = torch.cat([attn.query.weight, attn.key.weight, attn.value.weight])  # (3 D, D)
        layers.append({"qkv": _weight(ext, qkv, precision),
                       "qkv_bias": torch.cat([attn.query.bias, attn.key.bias, attn.value.bias]).detach(),
                       "out": _weight(ext, layer.attention.output.dense.weight, precision),
                       "up": _weight(ext, layer.intermediate.dense.weight, precision),
                       "down": _weight(ext, layer.output.dense.weight, precision)})
    _PREPARED[model][precision] = (signature, layers)
    return layers


def default_precision() -> Precision:
    """bf16x3 where the CPU has AMX-BF16 tiles (about 2x MKL's fp32 GEMMs), fp32 elsewhere."""
    ext = kernels.extension()
    return "bf16x3" if ext is not None and ext.amx_available() else "fp32"


def _layer(ext, layer: EncoderLayer, w: dict, x: torch.Tensor, cu_seqlens: torch.Tensor) -> None:
    """One post-norm block on packed rows x (N, n_embd), in place."""
    attn, out = layer.attention.self, layer.attention.output
    context = ext.varlen_attention(w["qkv"](ext, x), w["qkv_bias"], cu_seqlens, attn.n_head, attn.scale)  # (N, D)
    ext.add_layernorm_(x, w["out"](ext, context), out.dense.bias, out.LayerNorm.weight, out.LayerNorm.bias,
                       out.LayerNorm.eps)
    up, down = layer.intermediate, layer.output
    h = w["up"](ext, x)  # (N, intermediate), before bias and GELU
    if up.approximate == "none" and w["down"].tiles:  # GELU applied while h is split for the AMX product
        y = ext.gelu_linear_bf16x3(h, up.dense.bias, w["down"].tensor, w["down"].n)
    else:
        if up.approximate == "none":
            ext.bias_gelu_(h, up.dense.bias)
        else:
            h = F.gelu(h + up.dense.bias, approximate=up.approximate)
        y = w["down"](ext, h)
    ext.add_layernorm_(x, y, down.dense.bias, down.LayerNorm.weight, down.LayerNorm.bias, down.LayerNorm.eps)


@torch.inference_mode()
def fused_hidden_states(model: Encoder, packed: Packed, precision: Precision | None = None) -> torch.Tensor:
    """Last hidden states (N, n_embd) of the packed rows, on the fused kernels (check `usable` first).
    precision: "fp32" (MKL GEMMs) or "bf16x3" (AMX, within ~1e-5 relative of fp32); None: default_precision()."""
    model.check_length(int(packed.lengths.max()))
    ext = kernels.extension()
    precision = precision or default_precision()
    if precision not in ("fp32", "bf16x3"):
        raise ValueError(f"precision={precision!r} must be 'fp32' or 'bf16x3'")
    if precision == "bf16x3" and not ext.amx_available():
        raise ValueError("precision='bf16x3' needs AMX-BF16 tiles, which this CPU (or kernel) does not offer; "
                         "use precision='fp32'")
    x = _embed(model, packed).contiguous()
    for layer, weights in zip(model.encoder.layer, _prepare(ext, model, precision)):
        _layer(ext, layer, weights, x, packed.cu_seqlens)
    return x


def packed_pool(hidden: torch.Tensor, packed: Packed, pooling: Pooling = "mean", normalize: bool = True) -> torch.Tensor:
    """(B, n_embd) sentence vectors from packed hidden states (N, n_embd): first token or mean per sequence."""
    if pooling == "cls":
        pooled = hidden[packed.cu_seqlens[:-1]]
    else:
        lengths = packed.lengths
        segment = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
        pooled = hidden.new_zeros(len(lengths), hidden.shape[1]).index_add_(0, segment, hidden)
        pooled = pooled / lengths[:, None].to(hidden.dtype)
    return F.normalize(pooled, dim=-1) if normalize else pooled


def _padded(model: Encoder, seqs: list[list[int]], pooling: Pooling, normalize: bool) -> torch.Tensor:
    """The same vectors through Encoder.forward on a right-padded batch (any device and dtype)."""
    device = model.embeddings.word_embeddings.weight.device
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], mask[i, :len(s)] = torch.tensor(s), 1
    ids, mask = ids.to(device), mask.to(device)
    with torch.inference_mode():
        return sentence_embedding(model(ids, mask), mask, pooling, normalize).float().cpu()


def batches(order: list[int], lengths: list[int], batch_size: int, max_tokens: int) -> list[list[int]]:
    """Consecutive runs of `order` with at most batch_size sequences and max_tokens tokens each (a longer
    sequence goes alone)."""
    out: list[list[int]] = []
    tokens = 0
    for i in order:
        if not out or len(out[-1]) == batch_size or tokens + lengths[i] > max_tokens:
            out.append([])
            tokens = 0
        out[-1].append(i)
        tokens += lengths[i]
    return out


def sentence_embeddings(model: Encoder, seqs: list[list[int]], pooling: Pooling = "mean", normalize: bool = True,
                        batch_size: int = 32, fused: bool | None = None, precision: Precision | None = None,
                        max_tokens: int = MAX_TOKENS) -> torch.Tensor:
    """(len(seqs), n_embd) float32 sentence vectors in input order; sequences are sorted by length and
    run at most `batch_size` (and `max_tokens` tokens) at a time, packed on the fused kernels when `fused`
    (None: when `usable`), padded through Encoder.forward otherwise."""
    out = torch.empty(len(seqs), model.config.n_embd)
    fused = usable(model) if fused is None else fused
    lengths = [len(s) for s in seqs]
    order = sorted(range(len(seqs)), key=lengths.__getitem__)
    for idx in batches(order, lengths, batch_size, max_tokens):
        batch = [seqs[i] for i in idx]
        if fused:
            packed = pack(batch)
            out[idx] = packed_pool(fused_hidden_states(model, packed, precision), packed, pooling, normalize)
        else:
            out[idx] = _padded(model, batch, pooling, normalize)
    return out
