"""BERT-style encoder: embeddings, post-norm blocks with bidirectional attention, a masked-LM head,
and pooling into sentence embeddings.

Devlin et al. 2019, "BERT: Pre-training of Deep Bidirectional Transformers for Language
Understanding", https://arxiv.org/abs/1810.04805. Parameter names are Hugging Face's BertModel's
(embeddings.word_embeddings, encoder.layer.N.attention.self.query, ...) and its BertForMaskedLM
head's (cls.predictions.transform.dense, ...), so their safetensors load as they are, once the
"bert." prefix of BertForMaskedLM checkpoints is dropped (checkpoint/hf_bert.py).

Plain PyTorch, for training and as the reference; packed inference on fused CPU kernels is
model/encoder_fused.py, which callers (the RAG embedder) choose.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lmforge.config import Config
from lmforge.model.attention import math_attention, sdpa_attention
from lmforge.model.linear import Linear
from lmforge.model.block import init_weights, uninitialised_embedding

Pooling = Literal["mean", "cls"]


class Embeddings(nn.Module):
    """LayerNorm(word + token type + learned absolute position) embeddings (HF: embeddings)."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.word_embeddings = uninitialised_embedding(config.vocab_size, config.n_embd)
        self.position_embeddings = uninitialised_embedding(config.block_size, config.n_embd)
        self.token_type_embeddings = (uninitialised_embedding(config.type_vocab_size, config.n_embd)
                                      if config.type_vocab_size else None)
        self.LayerNorm = nn.LayerNorm(config.n_embd, eps=config.norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                token_type_ids: torch.Tensor | None) -> torch.Tensor:
        """input_ids, positions, token_type_ids: (B, T) -> (B, T, n_embd); no token types means type 0."""
        x = self.word_embeddings(input_ids)
        if self.token_type_embeddings is not None:  # summed in Hugging Face's order: words, types, positions
            types = self.token_type_embeddings
            x = x + (types(token_type_ids) if token_type_ids is not None else types.weight[0])
        return self.LayerNorm(x + self.position_embeddings(positions))


class SelfAttention(nn.Module):
    """Bidirectional multi-head attention: every token sees every real token (HF: attention.self)."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.n_head, self.head_dim = config.n_head, config.head_dim
        self.scale = config.attn_scale
        self.use_math = config.attn_impl == "math"
        self.query = Linear(config.n_embd, config.n_embd)
        self.key = Linear(config.n_embd, config.n_embd)
        self.value = Linear(config.n_embd, config.n_embd)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """x: (B, T, n_embd); mask: bool (B, 1, 1 | T, T), True where a key may be seen -> (B, T, n_embd)."""
        B, T, D = x.shape
        q, k, v = (proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, n_head, T, hd)
                   for proj in (self.query, self.key, self.value))
        attend = math_attention if self.use_math else sdpa_attention
        y = attend(q, k, v, mask, False, self.scale)  # (B, n_head, T, hd)
        return y.transpose(1, 2).reshape(B, T, D)


class PostNorm(nn.Module):
    """LayerNorm(x + dense(h)): the residual and norm after attention and after the MLP (HF: *.output)."""

    def __init__(self, d_in: int, d_out: int, eps: float) -> None:
        super().__init__()
        self.dense = Linear(d_in, d_out)
        self.LayerNorm = nn.LayerNorm(d_out, eps=eps)

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(h) + x)


class AttentionBlock(nn.Module):
    """Self-attention, then the post-norm residual (HF: attention = self + output)."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.self = SelfAttention(config)
        self.output = PostNorm(config.n_embd, config.n_embd, config.norm_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return self.output(self.self(x, mask), x)


class Intermediate(nn.Module):
    """The MLP's widening half: gelu(dense(x)), exact erf GELU as BERT (HF: intermediate)."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.dense = Linear(config.n_embd, config.intermediate_size)
        self.approximate = "none" if config.mlp == "gelu_erf" else "tanh"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x), approximate=self.approximate)


class EncoderLayer(nn.Module):
    """Post-norm block: x = LN(x + attention(x)); x = LN(x + MLP(x)) (HF: encoder.layer.N)."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.attention = AttentionBlock(config)
        self.intermediate = Intermediate(config)
        self.output = PostNorm(config.intermediate_size, config.n_embd, config.norm_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = self.attention(x, mask)
        return self.output(self.intermediate(x), x)


class EncoderStack(nn.Module):
    """The blocks (HF: encoder.layer)."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.layer = nn.ModuleList(EncoderLayer(config) for _ in range(config.n_layer))


class PredictionTransform(nn.Module):
    """LN(gelu(dense(h))) before the vocabulary projection (HF: cls.predictions.transform)."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.dense = Linear(config.n_embd, config.n_embd)
        self.approximate = "none" if config.mlp == "gelu_erf" else "tanh"
        self.LayerNorm = nn.LayerNorm(config.n_embd, eps=config.norm_eps)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(F.gelu(self.dense(h), approximate=self.approximate))


class MLMHead(nn.Module):
    """Masked-LM head: transform, then the word embeddings (tied) or its own decoder, plus a vocab bias
    (HF: cls.predictions)."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.transform = PredictionTransform(config)
        self.decoder = None if config.tie_embeddings else Linear(config.n_embd, config.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, h: torch.Tensor, word_embeddings: torch.Tensor) -> torch.Tensor:
        weight = word_embeddings if self.decoder is None else self.decoder.weight
        return F.linear(self.transform(h), weight, self.bias)


class PretrainingHeads(nn.Module):
    """HF's `cls` container; only the masked-LM head (next-sentence prediction is not trained here)."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.predictions = MLMHead(config)


class Encoder(nn.Module):
    """BERT-style encoder: token ids -> contextual hidden states, masked-LM logits, sentence embeddings."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        if config.arch != "encoder":
            raise ValueError(f"Encoder builds arch='encoder' configs; {config.name} is arch={config.arch!r} "
                             "(lmforge.model.transformer.model_class picks the module for a config)")
        self.config = config
        self.embeddings = Embeddings(config)
        self.encoder = EncoderStack(config)
        self.cls = PretrainingHeads(config) if config.mlm_head else None

    def check_length(self, length: int) -> None:
        """Refuse sequences longer than the learned position table (they have no position embedding)."""
        if length > self.config.block_size:
            raise ValueError(f"sequence length {length} is longer than the position table of {self.config.name} "
                             f"({self.config.block_size} positions); truncate inputs to {self.config.block_size} "
                             "tokens")

    def hidden_states(self, input_ids: torch.Tensor, mask: torch.Tensor | None = None,
                      token_type_ids: torch.Tensor | None = None,
                      positions: torch.Tensor | None = None) -> torch.Tensor:
        """Last hidden states (B, T, n_embd); blocks are recomputed in backward with
        `self.gradient_checkpointing` (the training loop sets it).

        Args:
            input_ids: (B, T) token ids.
            mask: bool (B, 1, 1 | T, T), True where a query may attend to a key; None: all.
            token_type_ids: (B, T) segment ids; None: all 0.
            positions: (B, T) positions; None: 0..T-1 (packed rows restart them per example).
        """
        B, T = input_ids.shape
        self.check_length(T)
        if positions is None:
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
        elif positions.numel() and int(positions.max()) >= self.config.block_size:
            self.check_length(int(positions.max()) + 1)
        x = self.embeddings(input_ids, positions, token_type_ids)
        use_ckpt = getattr(self, "gradient_checkpointing", False) and torch.is_grad_enabled()
        for layer in self.encoder.layer:
            x = checkpoint(layer, x, mask, use_reentrant=False) if use_ckpt else layer(x, mask)
        return x

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Last hidden states (B, T, n_embd), as Hugging Face's BertModel(...).last_hidden_state.

        Args:
            input_ids: (B, T) token ids.
            attention_mask: (B, T), 1 (or True) at real tokens, 0 at padding; None: no padding.
            token_type_ids: (B, T) segment ids; None: all 0.
        """
        return self.hidden_states(input_ids, key_mask(attention_mask), token_type_ids)

    def mlm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits (..., vocab) of hidden states (..., n_embd) from the masked-LM head."""
        if self.cls is None:
            raise ValueError(f"{self.config.name} has no masked-LM head (mlm_head=False, as embedding-only "
                             "checkpoints such as all-MiniLM-L6-v2); build it with mlm_head=True to pretrain")
        return self.cls.predictions(hidden, self.embeddings.word_embeddings.weight)


def key_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """A (B, T) 1/0 padding mask as the bool (B, 1, 1, T) key mask attention takes; None stays None.
    Every row needs a real token: attention over no key at all has no value."""
    if attention_mask is None:
        return None
    real = attention_mask.bool()
    if not bool(real.any(-1).all()):
        empty = (~real.any(-1)).nonzero().flatten().tolist()
        raise ValueError(f"attention_mask rows {empty[:5]} have no real token; drop empty inputs or keep [CLS]/[SEP]")
    return real[:, None, None, :]


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the hidden states (B, T, D) over real tokens (attention_mask (B, T) 1/0) -> (B, D),
    as sentence-transformers' mean pooling."""
    weights = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


def sentence_embedding(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: Pooling = "mean",
                       normalize: bool = True) -> torch.Tensor:
    """(B, D) sentence vectors: the [CLS] token's state or the mean over real tokens, optionally
    L2-normalised (sentence-transformers' Normalize module, which all-MiniLM-L6-v2 ends with)."""
    if pooling not in ("mean", "cls"):
        raise ValueError(f"pooling={pooling!r} must be 'mean' or 'cls'")
    pooled = hidden[:, 0] if pooling == "cls" else mean_pool(hidden, attention_mask)
    return F.normalize(pooled, dim=-1) if normalize else pooled


def build_encoder(config: Config, device: torch.device | str = "cpu") -> Encoder:
    """A randomly initialised encoder (BERT's normal(0, 0.02), zero biases, unit LayerNorms)."""
    with torch.device(device):
        model = Encoder(config)
    if device != "meta":
        init_weights(model)
    return model
