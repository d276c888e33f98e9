"""BERT checkpoints in the Hugging Face layout (BertModel, BertForMaskedLM, BertForPreTraining, and
sentence-transformers folders such as all-MiniLM-L6-v2), read and written.

Tensor names are already lmforge's (model/encoder.py names its parameters as BertModel does). The
one mapping: BertForMaskedLM/BertForPreTraining keep the encoder under "bert.", which is dropped on
reading and added on writing a model with an MLM head. Tensors lmforge does not build are skipped
by name (SKIPPED); any other name reaches the loader, which refuses it as unexpected.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from lmforge.checkpoint.errors import CheckpointError
from lmforge.config import BERT_STYLE, Config

BERT_TYPES = ("bert",)
# Hugging Face hidden_act -> lmforge mlp kind: "gelu" is the exact erf GELU, the others its tanh form
ACTIVATIONS = {"gelu": "gelu_erf", "gelu_new": "gelu", "gelu_pytorch_tanh": "gelu"}
# tensors of heads lmforge does not build: the pooler and the next-sentence head (NSP pretraining),
# the position_ids buffer, and the decoder bias, which is an alias of cls.predictions.bias
SKIPPED = ("embeddings.position_ids", "pooler.", "cls.seq_relationship.", "cls.predictions.decoder.bias")


def tensor_names(path: Path) -> list[str]:
    """The tensor names of a Hugging Face folder's safetensors files, read from their headers only."""
    names: list[str] = []
    for file in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(file), "pt") as f:
                names += list(f.keys())
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{file}: unreadable safetensors ({err}); download it again") from None
    return names


def bert_config(cfg: dict[str, Any], path: Path) -> Config:
    """A Config from a BertConfig config.json; the MLM head is built when the checkpoint has one."""
    if cfg.get("is_decoder") or cfg.get("add_cross_attention"):
        raise CheckpointError("is_decoder/add_cross_attention: this BERT is a causal decoder; lmforge's encoder "
                              "is bidirectional (use a decoder checkpoint for generation)")
    kind = cfg.get("position_embedding_type", "absolute")
    if kind != "absolute":
        raise CheckpointError(f"position_embedding_type={kind!r} is not supported; lmforge's encoder has learned "
                              "absolute positions ('absolute')")
    act = cfg.get("hidden_act", "gelu")
    if act not in ACTIVATIONS:
        raise CheckpointError(f"hidden_act={act!r} is not supported; lmforge's encoder MLP uses {sorted(ACTIVATIONS)}")
    names = tensor_names(path)
    head = any(name.startswith("cls.predictions.") for name in names)
    return Config(**dict(
        BERT_STYLE, name=path.name, vocab_size=cfg["vocab_size"], n_layer=cfg["num_hidden_layers"],
        n_embd=cfg["hidden_size"], n_head=cfg["num_attention_heads"], intermediate_size=cfg["intermediate_size"],
        block_size=cfg.get("max_position_embeddings", 512), type_vocab_size=cfg.get("type_vocab_size", 2),
        norm_eps=cfg.get("layer_norm_eps", 1e-12), mlp=ACTIVATIONS[act], mlm_head=head,
        tie_embeddings=cfg.get("tie_word_embeddings", True)))


def bert_state(raw: dict[str, torch.Tensor], config: Config) -> dict[str, torch.Tensor]:
    """Hub tensors under lmforge's names: "bert." dropped, heads lmforge does not build skipped, and
    the tied decoder weight (a copy of the word embeddings) left to the model's own tie."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in raw.items():
        name = key.removeprefix("bert.")
        if name.startswith(SKIPPED) or (config.tie_embeddings and name == "cls.predictions.decoder.weight"):
            continue
        out[name] = tensor
    return out


def hf_bert_config(config: Config) -> dict[str, Any]:
    """config.json for an encoder, read by transformers' BertConfig (BertForMaskedLM with an MLM head)."""
    if not config.type_vocab_size:
        raise ValueError("type_vocab_size=0: Hugging Face's BERT always has token type embeddings; "
                         "build the encoder with type_vocab_size >= 1 to export it")
    act = {"gelu_erf": "gelu", "gelu": "gelu_new"}[config.mlp]
    return dict(model_type="bert", architectures=["BertForMaskedLM" if config.mlm_head else "BertModel"],
                vocab_size=config.vocab_size, hidden_size=config.n_embd, num_hidden_layers=config.n_layer,
                num_attention_heads=config.n_head, intermediate_size=config.intermediate_size,
                max_position_embeddings=config.block_size, type_vocab_size=config.type_vocab_size,
                layer_norm_eps=config.norm_eps, hidden_act=act, position_embedding_type="absolute",
                tie_word_embeddings=config.tie_embeddings, pad_token_id=0, torch_dtype="float32")


def hf_bert_state(state: dict[str, torch.Tensor], config: Config) -> dict[str, torch.Tensor]:
    """lmforge's encoder tensors under BertForMaskedLM's names ("bert." before all but the head), or
    BertModel's (as they are) without a head."""
    if not config.mlm_head:
        return dict(state)
    return {name if name.startswith("cls.") else f"bert.{name}": tensor for name, tensor in state.items()}
