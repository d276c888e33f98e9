"""Load a model from a GGUF file or a Hugging Face directory: meta device, then assign."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lmforge.checkpoint.errors import CheckpointError
from lmforge.checkpoint.gguf_blocks import BlockTensor, GGUFEmbedding, GGUFLinear
from lmforge.checkpoint.hf_mamba import check_family
from lmforge.config import Config
from lmforge.model.transformer import Transformer, decode_layout, model_class


def swap_block_modules(model: Transformer, state: dict[str, torch.Tensor | BlockTensor], source: str) -> bool:
    """Replace each linear or embedding whose weight is a BlockTensor in `state` by a GGUFLinear or
    GGUFEmbedding (on the meta device, like the rest), its key becoming `<module>.blocks`; whether any was."""
    swapped = False
    for name, tensor in list(state.items()):
        if not isinstance(tensor, BlockTensor):
            continue
        path = name.removesuffix(".weight")
        parent, _, attr = path.rpartition(".")
        old = model.get_submodule(path)
        if tuple(old.weight.shape) != tuple(tensor.shape):
            raise CheckpointError(f"{source}: tensor {name} has shape {tuple(tensor.shape)}, the config expects "
                                  f"{tuple(old.weight.shape)}")
        n, k = tensor.shape
        if isinstance(old, nn.Embedding):
            new = GGUFEmbedding(n, k, tensor.qtype, device="meta")
        else:
            new = GGUFLinear(k, n, tensor.qtype, bias=getattr(old, "bias", None) is not None, device="meta")
        setattr(model.get_submodule(parent), attr, new)
        del state[name]
        state[f"{path}.blocks"] = tensor.blocks
        swapped = True
    return swapped


def _tie(model: Transformer) -> None:
    """Point lm_head at the embedding's weight, or at its blocks when the embedding keeps blocks."""
    embedding = model.backbone.embeddings if model.config.arch == "mamba" else model.model.embed_tokens
    if isinstance(embedding, GGUFEmbedding):
        model.lm_head = GGUFLinear.tied_to(embedding)
    else:
        model.lm_head.weight = embedding.weight


def assign_state(config: Config, state: dict[str, torch.Tensor | BlockTensor], source: str,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> Transformer:
    """Build the model on the meta device and adopt `state` tensors without copying them twice;
    BlockTensors become GGUFLinear/GGUFEmbedding modules holding their blocks."""
    check_family(config, state, source)
    with torch.device("meta"):
        model = model_class(config)(config)
    if config.tie_embeddings:
        state.pop("lm_head.weight", None)
    native = swap_block_modules(model, state, source)
    expected = model.state_dict()
    if config.tie_embeddings:
        expected.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{source}: tensors do not match the model: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}; is the config right for this checkpoint?")
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise CheckpointError(f"{source}: tensor {name} has shape {tuple(tensor.shape)}, the config expects "
                                  f"{tuple(expected[name].shape)}")
    state = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else None)  # no copy when already there
             for k, v in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_embeddings and config.arch not in ("encoder", "encoder_decoder"):  # their heads read the embedding
        _tie(model)
    # decode_layout reads lm_head.weight, which a GGUFLinear would dequantize; blocks have one layout
    return model.eval() if native or config.arch != "transformer" else decode_layout(model).eval()


def load_model(path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
               attn_impl: str | None = None) -> Transformer:
    """A Transformer from a .gguf file or a Hugging Face directory (config.json + safetensors).

    dtype None: a quantized GGUF on the CPU keeps its linear weights and token embedding in their
    blocks (GGUFLinear/GGUFEmbedding on lmforge's kernels), and everything else loads as float32; a
    dtype (torch.float32 for the dequantized model) dequantizes every weight to it.
    """
    path = Path(path)
    try:
        return _load_model(path, dtype, device, attn_impl)
    except CheckpointError as err:  # every message names the file it is about
        if str(path) in str(err):
            raise
        raise CheckpointError(f"{path}: {err}") from None


def _load_model(path: Path, dtype: torch.dtype | None, device: str | torch.device,
                attn_impl: str | None) -> Transformer:
    if (path / "quantization.json").is_file():  # written by `lmforge quantize`: kept quantized, computed as such
        from lmforge.quantization.quantize import load_quantized

        if dtype not in (None, torch.float32):
            raise CheckpointError(f"{path}: a quantized model computes in its own kernels' types; load it "
                                  f"without a dtype (got {dtype})")
        return load_quantized(path, device=str(device), attn_impl=attn_impl)
    if path.is_dir():
        from lmforge.checkpoint.hf import config_from_hf, read_hf_state

        config = config_from_hf(path)
        state = read_hf_state(path, config)
    else:
        from lmforge.checkpoint.gguf import config_from_gguf, open_gguf, read_state_dict

        reader = open_gguf(path)
        config = config_from_gguf(reader, name=path.stem)
        native = dtype is None and torch.device(device).type == "cpu"  # the kernels are CPU code
        state = read_state_dict(reader, config, reader.metadata["general.architecture"], native=native)
    if attn_impl:
        config.attn_impl = attn_impl
    return assign_state(config, state, str(path), dtype=dtype or torch.float32, device=device)


def load(path: str | Path, **kwargs):
    """(model, tokenizer) from a checkpoint; the tokenizer is read from the same file or folder."""
    from lmforge.checkpoint.gguf import open_gguf
    from lmforge.tokenizer import Tokenizer

    path = Path(path)
    model = load_model(path, **kwargs)
    if path.is_dir():
        return model, Tokenizer.from_hf_dir(path)
    return model, Tokenizer.from_gguf(open_gguf(path))
