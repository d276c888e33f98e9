"""T5 checkpoints in the Hugging Face layout (T5ForConditionalGeneration), read.

Tensor names are already lmforge's (model/encoder_decoder.py names its parameters as
T5ForConditionalGeneration does). The one mapping: encoder.embed_tokens and decoder.embed_tokens
are aliases of `shared` (and lm_head too when tied), dropped on reading.
"""

from __future__ import annotations

from typing import Any

import torch

from lmforge.checkpoint.errors import CheckpointError
from lmforge.config import T5_STYLE, Config

T5_TYPES = ("t5",)
# Hugging Face feed_forward_proj -> lmforge mlp kind (T5 v1.0 relu, v1.1 gated-gelu with the tanh GELU)
FEED_FORWARD = {"relu": "relu", "gated-gelu": "geglu"}
ALIASES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")


def tied_and_scaled(cfg: dict[str, Any]) -> bool:
    """Whether the decoder output is scaled by d_model**-0.5 before `shared` (T5 v1.0). T5 v1.1 says
    no with tie_word_embeddings=false (and its own lm_head); transformers 5 always ties, writes
    tie_word_embeddings=true and says no with scale_decoder_outputs=false instead."""
    return cfg.get("tie_word_embeddings", True) is not False and cfg.get("scale_decoder_outputs", True) is not False


def t5_config(cfg: dict[str, Any], name: str) -> Config:
    """A Config from a T5Config config.json."""
    proj = cfg.get("feed_forward_proj", "relu")
    if proj not in FEED_FORWARD:
        raise CheckpointError(f"feed_forward_proj={proj!r} is not supported; lmforge's T5 builds "
                              f"{sorted(FEED_FORWARD)}")
    if not cfg.get("is_encoder_decoder", True):
        raise CheckpointError("is_encoder_decoder=false: an encoder-only T5 (T5EncoderModel) is not built; "
                              "lmforge reads T5ForConditionalGeneration checkpoints")
    return Config(**dict(
        T5_STYLE, name=name, vocab_size=cfg["vocab_size"], n_layer=cfg["num_layers"],
        n_decoder_layer=cfg.get("num_decoder_layers") or cfg["num_layers"], n_embd=cfg["d_model"],
        n_head=cfg["num_heads"], head_dim=cfg["d_kv"], intermediate_size=cfg["d_ff"],
        block_size=cfg.get("n_positions", 512), norm_eps=cfg.get("layer_norm_epsilon", 1e-6),
        mlp=FEED_FORWARD[proj], tie_embeddings=tied_and_scaled(cfg),
        relative_attention_num_buckets=cfg.get("relative_attention_num_buckets", 32),
        relative_attention_max_distance=cfg.get("relative_attention_max_distance", 128),
        decoder_start_token_id=cfg.get("decoder_start_token_id", 0) or 0))


def t5_state(raw: dict[str, torch.Tensor], config: Config) -> dict[str, torch.Tensor]:
    """Hub tensors under lmforge's names: the embed_tokens aliases of `shared` dropped, and lm_head
    too when the config ties it (the model reads `shared` itself); an unscaled head without its own
    tensor (written by transformers 5, which ties it) is a copy of `shared`."""
    drop = ALIASES + (("lm_head.weight",) if config.tie_embeddings else ())
    state = {k: v for k, v in raw.items() if k not in drop}
    if not config.tie_embeddings and "lm_head.weight" not in state and "shared.weight" in state:
        state["lm_head.weight"] = state["shared.weight"].clone()
    return state


def hf_t5_config(config: Config) -> dict[str, Any]:
    """config.json for an encoder-decoder, read by transformers' T5Config (T5ForConditionalGeneration).
    An untied head says tie_word_embeddings=false, as T5 v1.1 hub files do."""
    proj = {mlp: name for name, mlp in FEED_FORWARD.items()}[config.mlp]
    return dict(model_type="t5", architectures=["T5ForConditionalGeneration"], vocab_size=config.vocab_size,
                d_model=config.n_embd, d_kv=config.head_dim, d_ff=config.intermediate_size,
                num_layers=config.n_layer, num_decoder_layers=config.n_decoder_layer, num_heads=config.n_head,
                relative_attention_num_buckets=config.relative_attention_num_buckets,
                relative_attention_max_distance=config.relative_attention_max_distance,
                layer_norm_epsilon=config.norm_eps, feed_forward_proj=proj, n_positions=config.block_size,
                is_encoder_decoder=True, tie_word_embeddings=config.tie_embeddings, dropout_rate=0.0,
                decoder_start_token_id=config.decoder_start_token_id, pad_token_id=0, eos_token_id=1,
                torch_dtype="float32")
