"""Mamba checkpoints in the Hugging Face layout (MambaForCausalLM), and which family a checkpoint is.

Tensor names are already lmforge's (model/mamba.py names its parameters as transformers does);
only the older `backbone.embedding.` spelling is renamed. `checkpoint_family` reads the family
from the tensor names, so a Mamba checkpoint given to a transformer config, or the other way
round, fails with a message that says so instead of a list of missing tensors.
"""

from __future__ import annotations

from typing import Any

import torch

from lmforge.checkpoint.errors import CheckpointError
from lmforge.config import MAMBA_STYLE, Config

MAMBA_TYPES = ("mamba",)
# state-space model types transformers knows whose mixer is not Mamba-1's
OTHER_SSM_TYPES = {
    "mamba2": "Mamba-2's SSD mixer (a scalar decay per head, grouped B/C convolved with x, a gated RMSNorm)",
    "falcon_mamba": "Falcon-Mamba (RMS norms on B, C and delta inside the mixer)",
    "jamba": "Jamba (its MoE feed-forward and layer names)",
    "bamba": "Bamba (Mamba-2 mixers)", "zamba": "Zamba (shared attention blocks)",
    "zamba2": "Zamba2 (Mamba-2 mixers)", "falcon_h1": "Falcon-H1 (Mamba-2 mixers in parallel with attention)",
}
FAMILY_PREFIXES = {"mamba": ("backbone.",), "transformer": ("model.", "transformer.h.", "transformer.wte."),
                   "encoder": ("embeddings.word_embeddings.", "encoder.layer.", "cls.predictions."),
                   "encoder_decoder": ("encoder.block.", "decoder.block.")}
# each family's checkpoint, by the names that give it away, and what a config of it builds
FAMILY_NAMES = {"mamba": ("a Mamba checkpoint (backbone.layers.N.mixer.*)", "a Mamba model (arch='mamba')",
                          "tiny-mamba, mamba-130m"),
                "transformer": ("a transformer checkpoint (model.layers.N.self_attn.*)", "a transformer",
                                "tiny-llama, smollm2-135m"),
                "encoder": ("a BERT-style encoder checkpoint (encoder.layer.N.attention.*)",
                            "a BERT-style encoder (arch='encoder')", "tiny-bert, all-minilm-l6-v2"),
                "encoder_decoder": ("a T5 checkpoint (encoder.block.N.layer.0.SelfAttention.*)",
                                    "a T5 encoder-decoder (arch='encoder_decoder')", "tiny-t5")}


def mamba_config(cfg: dict[str, Any], name: str) -> Config:
    """A Config from a MambaConfig config.json."""
    if cfg.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"hidden_act={cfg['hidden_act']!r}: lmforge's Mamba mixer gates with silu")
    hidden, expand = cfg["hidden_size"], cfg.get("expand", 2)
    if cfg.get("intermediate_size", expand * hidden) != expand * hidden:
        raise CheckpointError(f"intermediate_size={cfg['intermediate_size']} is not expand * hidden_size = "
                              f"{expand * hidden}; Mamba's inner width is expand * hidden_size")
    rank = cfg.get("time_step_rank", "auto")
    return Config(**dict(
        MAMBA_STYLE, name=name, vocab_size=cfg["vocab_size"], n_layer=cfg["num_hidden_layers"], n_embd=hidden,
        d_state=cfg.get("state_size", 16), d_conv=cfg.get("conv_kernel", 4), expand=expand,
        dt_rank=None if rank == "auto" else int(rank), bias=cfg.get("use_bias", False),
        conv_bias=cfg.get("use_conv_bias", True), norm_eps=cfg.get("layer_norm_epsilon", 1e-5),
        tie_embeddings=cfg.get("tie_word_embeddings", True)))


def mamba_state(raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hub tensors under lmforge's names: older checkpoints spell the embedding `backbone.embedding.`."""
    return {k.replace("backbone.embedding.", "backbone.embeddings.", 1): v for k, v in raw.items()}


def hf_mamba_config(config: Config) -> dict[str, Any]:
    """config.json for a pure Mamba model, read by transformers' MambaConfig."""
    if "attention" in config.mixers:
        raise ValueError(f"{config.name} is a hybrid (mixers {config.mixers}); Hugging Face's Mamba layout has no "
                         "attention layers, so only pure Mamba models are written")
    return dict(model_type="mamba", architectures=["MambaForCausalLM"], vocab_size=config.vocab_size,
                hidden_size=config.n_embd, num_hidden_layers=config.n_layer, state_size=config.d_state,
                conv_kernel=config.d_conv, expand=config.expand, intermediate_size=config.d_inner,
                time_step_rank=config.dt_rank, use_bias=config.bias, use_conv_bias=config.conv_bias,
                layer_norm_epsilon=config.norm_eps, hidden_act="silu", residual_in_fp32=True,
                tie_word_embeddings=config.tie_embeddings, torch_dtype="float32")


def checkpoint_family(names) -> str | None:
    """'mamba', 'transformer' or 'encoder' from a checkpoint's tensor names; None when they name none."""
    for family, prefixes in FAMILY_PREFIXES.items():
        if any(name.startswith(prefixes) for name in names):
            return family
    return None


def check_family(config: Config, names, source: str) -> None:
    """Refuse a checkpoint whose tensors belong to another model family than the config builds."""
    family = checkpoint_family(names)
    wanted = config.arch if config.arch in FAMILY_NAMES else "transformer"
    if family is None or family == wanted:
        return
    what, _, presets = FAMILY_NAMES[family]
    raise CheckpointError(f"{source} is {what} but the config {config.name!r} builds {FAMILY_NAMES[wanted][1]}; "
                          f"load it with its own config.json or a preset of its family ({presets})")
