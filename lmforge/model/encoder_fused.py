"""Packed encoder inference on lmforge's fused CPU kernels: real tokens only, no padding, no mask.

A batch of sequences is one (N, n_embd) block of rows, N the number of real tokens, with
cu_seqlens marking where each sequence starts (FlashAttention's varlen layout). Each block then
runs as four MKL GEMMs without bias (torch.mm; q/k/v fused into one) and three passes of
kernels/encoder.cpp around them: attention per (sequence, head) reading q/k/v and their bias from
the fused product, bias + residual + LayerNorm, bias + GELU. torch would spend extra memory passes
on each bias, the padding and the mask. Inference only; equal to Encoder.forward with a padding
mask to float rounding (tests/model/test_encoder.py). `sentence_embeddings` picks this path when
the kernels are built and the model is fp32 on the CPU, else the padded forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lmforge.kernels import encoder as kernels
from lmforge.model.encoder import Encoder, EncoderLayer, Pooling, sentence_embedding


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


def _layer(ext, layer: EncoderLayer, x: torch.Tensor, cu_seqlens: torch.Tensor) -> None:
    """One post-norm block on packed rows x (N, n_embd), in place."""
    attn, out = layer.attention.self, layer.attention.output
    w_qkv = torch.cat([attn.query.weight, attn.key.weight, attn.value.weight])  # (3 D, D)
    b_qkv = torch.cat([attn.query.bias, attn.key.bias, attn.value.bias])
    context = ext.varlen_attention(torch.mm(x, w_qkv.t()), b_qkv, cu_seqlens, attn.n_head, attn.scale)  # (N, D)
    ext.add_layernorm_(x, torch.mm(context, out.dense.weight.t()), out.dense.bias, out.LayerNorm.weight,
                       out.LayerNorm.bias, out.LayerNorm.eps)
    up = layer.intermediate
    h = torch.mm(x, up.dense.weight.t())  # (N, intermediate)
    if up.approximate == "none":
        ext.bias_gelu_(h, up.dense.bias)
    else:
        h = F.gelu(h + up.dense.bias, approximate=up.approximate)
    down = layer.output
    ext.add_layernorm_(x, torch.mm(h, down.dense.weight.t()), down.dense.bias, down.LayerNorm.weight,
                       down.LayerNorm.bias, down.LayerNorm.eps)


@torch.inference_mode()
def fused_hidden_states(model: Encoder, packed: Packed) -> torch.Tensor:
    """Last hidden states (N, n_embd) of the packed rows, on the fused kernels (check `usable` first)."""
    model.check_length(int(packed.lengths.max()))
    ext = kernels.extension()
    x = _embed(model, packed).contiguous()
    for layer in model.encoder.layer:
        _layer(ext, layer, x, packed.cu_seqlens)
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


def sentence_embeddings(model: Encoder, seqs: list[list[int]], pooling: Pooling = "mean", normalize: bool = True,
                        batch_size: int = 32) -> torch.Tensor:
    """(len(seqs), n_embd) float32 sentence vectors in input order; sequences are sorted by length and
    run `batch_size` at a time, packed on the fused kernels when `usable`, padded otherwise."""
    out = torch.empty(len(seqs), model.config.n_embd)
    fused = usable(model)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = [seqs[i] for i in idx]
        if fused:
            packed = pack(batch)
            out[idx] = packed_pool(fused_hidden_states(model, packed), packed, pooling, normalize)
        else:
            out[idx] = _padded(model, batch, pooling, normalize)
    return out
