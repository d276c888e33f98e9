"""GGUF export: the file reads back in our loader, the gguf library and llama.cpp, logits as quantization allows."""

from __future__ import annotations

import copy
import os
import resource
import signal

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader, GGUFWriter, LlamaFileType, TokenType
from gguf.quants import dequantize, quantize

from lmforge.checkpoint.gguf import open_gguf, unpermute_rope
from lmforge.checkpoint.gguf_export import TENSOR_TYPES, permute_rope, save_gguf
from lmforge.checkpoint.load import load, load_model
from lmforge.config import Config
from lmforge.model.transformer import build_model
from lmforge.tokenizer import Tokenizer

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("Ġ", "a"), ("i", "n"), ("Ġ", "c"), ("a", "t"), ("Ġc", "at")]
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TEXT = "the cat sat in the hat, <|im_start|>then 42 cats ate."


def gpt2_byte_chars() -> list[str]:
    """GPT-2's bytes_to_unicode, in byte order (the reference table, written out independently)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b], extra = chr(256 + extra), extra + 1
    return [table[b] for b in range(256)]


TOKENS = gpt2_byte_chars() + ["".join(m) for m in MERGES] + SPECIALS
VOCAB = len(TOKENS)  # 267


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return write_source(tmp_path_factory.mktemp("src") / "tok.gguf")


def write_source(path):
    """A tiny byte-level BPE tokenizer in a GGUF of its own (what a real GGUF carries, minus the tensors)."""
    w = GGUFWriter(path, "llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(TOKENS)
    w.add_token_types([int(TokenType.CONTROL if t in SPECIALS else TokenType.NORMAL) for t in TOKENS])
    w.add_token_merges([" ".join(m) for m in MERGES])
    w.add_bos_token_id(TOKENS.index("<|im_start|>"))
    w.add_eos_token_id(TOKENS.index("<|im_end|>"))
    w.add_pad_token_id(TOKENS.index("<|endoftext|>"))
    w.add_add_bos_token(False)
    w.add_chat_template(TEMPLATE)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def tiny(name: str = "tiny-llama", **overrides) -> torch.nn.Module:
    """A random model whose logits are far from uniform (std 0.1 weights, norms 1 + noise)."""
    model = build_model(Config.from_name(name, vocab_size=VOCAB, **overrides)).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            p.copy_(0.1 * torch.randn_like(p) + (p.dim() == 1 and not model.config.norm_unit_offset))
    return model


def ids_of(n: int = 24) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(1))


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(ids)[0].float()


def round_trip(w: torch.Tensor, qtype: Q) -> torch.Tensor:
    """dequantize(quantize(W)) through the gguf library, computed here independently of the exporter."""
    w = w.detach().contiguous().numpy().astype(np.float32)
    return torch.from_numpy(dequantize(quantize(w, qtype), qtype).reshape(w.shape))


def fake_quantized(model, qtype: Q):
    """The model with every matrix replaced by its quantization round trip."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for p in ref.parameters():
            if p.dim() == 2:
                p.copy_(round_trip(p, qtype))
    return ref


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# -- round trip through our loader -----------------------------------------------------------------
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma3"])
def test_f32_export_loads_with_equal_logits_and_tokenizer(source, tmp_path, name):
    model = tiny(name)
    out = save_gguf(model, source, tmp_path / "m.gguf", "f32")
    assert os.listdir(tmp_path) == ["m.gguf"] and out.stat().st_mode & 0o644 == 0o644  # no temp file; readable
    back, tok = load(out)
    ids = ids_of()
    torch.testing.assert_close(logits(back, ids), logits(model, ids))
    src_tok = Tokenizer.from_gguf(source)
    assert tok.encode(TEXT) == src_tok.encode(TEXT)
    assert tok.chat_template.source == TEMPLATE
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == tuple(TOKENS.index(t) for t in SPECIALS[1:] + SPECIALS[:1])


@pytest.mark.parametrize("tensor_type", ["f16", "q8_0", "q4_0"])
def test_quantized_export_holds_exactly_the_quantized_weights(source, tmp_path, tensor_type):
    model, qtype = tiny(), TENSOR_TYPES[tensor_type]
    out = save_gguf(model, source, tmp_path / "m.gguf", tensor_type)
    ids = ids_of()
    got, ref, exact = logits(load_model(out), ids), logits(fake_quantized(model, qtype), ids), logits(model, ids)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    # Bound from the quantization itself: to first order the relative errors of the matrices on the path add
    # up (measured: the logits move 0.1-0.3x their sum, for every type, in both architectures).
    weight_errs = [rel_err(round_trip(p, qtype), p.detach()) for p in model.parameters() if p.dim() == 2]
    assert rel_err(got, exact) < sum(weight_errs)
    if tensor_type != "q4_0":  # random logits are near-ties, and Q4_0 flips about half of them
        assert (got.argmax(-1) == exact.argmax(-1)).float().mean() >= 0.85


def test_metadata_and_tensor_types(source, tmp_path):
    model = tiny(tie_embeddings=False)
    cfg = model.config
    out = save_gguf(model, source, tmp_path / "m.gguf", "q8_0")
    reader = GGUFReader(out)
    f = {k: v.contents() for k, v in reader.fields.items()}
    assert f["general.architecture"] == "llama" and f["general.file_type"] == LlamaFileType.MOSTLY_Q8_0
    expected = {"context_length": cfg.block_size, "embedding_length": cfg.n_embd, "block_count": cfg.n_layer,
                "feed_forward_length": cfg.intermediate_size, "attention.head_count": cfg.n_head,
                "attention.head_count_kv": cfg.n_kv_head, "rope.dimension_count": cfg.head_dim}
    assert {k: f[f"llama.{k}"] for k in expected} == expected
    assert f["llama.rope.freq_base"] == pytest.approx(cfg.rope_theta)
    assert f["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg.norm_eps)
    source_fields = GGUFReader(source).fields
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                "tokenizer.ggml.bos_token_id", "tokenizer.chat_template", "tokenizer.ggml.pre"):
        assert f[key] == source_fields[key].contents() and reader.fields[key].types == source_fields[key].types
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert len(types) == 2 + 9 * cfg.n_layer + 1
    assert types["output.weight"] == types["token_embd.weight"] == types["blk.1.ffn_down.weight"] == Q.Q8_0
    assert types["output_norm.weight"] == types["blk.0.attn_norm.weight"] == Q.F32
    ours = open_gguf(out)  # our reader agrees on names and shapes (numpy order)
    assert {t.name: t.shape for t in ours.tensors}["blk.0.attn_k.weight"] == (cfg.n_kv_head * cfg.head_dim, cfg.n_embd)
    tied = GGUFReader(save_gguf(tiny(), source, tmp_path / "tied.gguf", "q8_0"))
    assert "output.weight" not in {t.name for t in tied.tensors}


def test_rows_off_the_block_size_fall_back_to_f16(source, tmp_path):
    model = tiny(n_embd=48, n_head=4, n_kv_head=2)  # rows of 48 are not a multiple of Q8_0's 32
    with pytest.warns(UserWarning, match="not a multiple"):
        out = save_gguf(model, source, tmp_path / "m.gguf", "q8_0")
    types = {t.name: t.tensor_type for t in GGUFReader(out).tensors}
    assert types["blk.0.attn_q.weight"] == Q.F16 and types["blk.0.ffn_down.weight"] == Q.Q8_0  # rows of 128
    assert rel_err(logits(load_model(out), ids_of()), logits(model, ids_of())) < 1e-2


def test_permute_rope_is_llama_cpps_permutation_and_inverts_unpermute():
    w = torch.randn(3 * 16, 40)

    def llama_cpp_permute(weights: np.ndarray, n_head: int) -> np.ndarray:  # convert_hf_to_gguf.py's LlamaModel.permute
        return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
                .swapaxes(1, 2).reshape(weights.shape))

    np.testing.assert_array_equal(permute_rope(w, 3).numpy(), llama_cpp_permute(w.numpy(), 3))
    torch.testing.assert_close(unpermute_rope(permute_rope(w, 3), 3), w, rtol=0, atol=0)


def test_tokenizer_from_a_hugging_face_directory(source, tmp_path):
    src_tok = Tokenizer.from_gguf(source)
    src_tok.save_hf(tmp_path / "hf")
    out = save_gguf(tiny(), tmp_path / "hf", tmp_path / "m.gguf", "f32")
    f = GGUFReader(out).fields
    assert f["tokenizer.ggml.tokens"].contents() == TOKENS
    assert f["tokenizer.ggml.merges"].contents() == [" ".join(m) for m in MERGES]
    assert f["tokenizer.ggml.token_type"].contents()[-3:] == [int(TokenType.CONTROL)] * 3
    assert f["tokenizer.ggml.pre"].contents() == "gpt-2" and f["tokenizer.ggml.model"].contents() == "gpt2"
    tok, hf_tok = Tokenizer.from_gguf(out), Tokenizer.from_hf_dir(tmp_path / "hf")
    assert tok.encode(TEXT) == hf_tok.encode(TEXT) == src_tok.encode(TEXT)
    assert tok.chat_template.source == TEMPLATE and tok.eos_id == src_tok.eos_id


def test_cli_exports_a_hugging_face_directory_to_gguf(source, tmp_path, capsys):
    from lmforge.checkpoint.hf import save_hf
    from lmforge.cli import main

    model = tiny()
    save_hf(model, tmp_path / "hf")
    Tokenizer.from_gguf(source).save_hf(tmp_path / "hf")
    assert main(["export", str(tmp_path / "hf"), "--out", str(tmp_path / "m.gguf"), "--format", "gguf",
                 "--gguf-type", "q8_0"]) == 0
    assert "m.gguf" in capsys.readouterr().out
    back, tok = load(tmp_path / "m.gguf")
    torch.testing.assert_close(logits(back, ids_of()), logits(fake_quantized(model, Q.Q8_0), ids_of()),
                               atol=1e-5, rtol=1e-5)
    assert tok.encode(TEXT) == Tokenizer.from_gguf(source).encode(TEXT)


# -- refusals and atomic writes --------------------------------------------------------------------
def test_refuses_what_it_cannot_write(source, tmp_path):
    with pytest.raises(ValueError, match="GPT-2"):
        save_gguf(build_model(Config.from_name("tiny-gpt2", vocab_size=VOCAB)), source, tmp_path / "a.gguf")
    with pytest.raises(ValueError, match="tensor_type 'q4_k'"):
        save_gguf(tiny(), source, tmp_path / "a.gguf", "q4_k")
    with pytest.raises(ValueError, match="267 tokens but the model's vocab_size is 256"):
        save_gguf(build_model(Config.from_name("tiny-llama")), source, tmp_path / "a.gguf")
    with pytest.raises(ValueError, match="does not exist"):
        save_gguf(tiny(), source, tmp_path / "missing" / "a.gguf")
    assert sorted(os.listdir(tmp_path)) == []


def test_failed_write_leaves_the_old_file_and_no_partial(source, tmp_path):
    target = tmp_path / "m.gguf"
    target.write_bytes(b"old")
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))  # the disk "fills" after 64 KiB
    try:
        with pytest.raises(OSError, match="no file was left behind"):
            save_gguf(tiny(), source, target, "f32")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    assert os.listdir(tmp_path) == ["m.gguf"] and target.read_bytes() == b"old"


# -- llama.cpp ---------------------------------------------------------------------------------------
def llama_cpp_logits(path, ids: list[int]) -> torch.Tensor:
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, verbose=False, n_ctx=max(64, len(ids)),
                          n_threads=2, type_k=0, type_v=0)  # F32 KV cache (the default is F16)
    llm.eval(ids)
    scores = torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))
    llm.close()
    return scores


# llama.cpp rounds activations to the weights' dot-product type (F16 for F16, Q8_0 for Q8_0 and Q4_0), so its
# logits differ from ours on the same stored weights by about what that rounding of the weights costs (measured
# 1.7-2.6e-2 for Q8_0); its GELU (Gemma) is an F16 lookup table, hence ~5e-4 even at F32.
@pytest.mark.parametrize(("name", "tensor_type", "tol", "overrides"), [
    ("tiny-llama", "f32", 1e-4, {}), ("tiny-llama", "f16", 5e-3, {}), ("tiny-llama", "q8_0", 5e-2, {}),
    ("tiny-llama", "q4_0", 5e-2, {}), ("tiny-gemma3", "f32", 2e-3, {}), ("tiny-gemma3", "q8_0", 5e-2, {}),
    ("tiny-llama", "f32", 1e-4, dict(tie_embeddings=False, rope_scaling="linear", rope_factor=4.0, n_kv_head=1))])
def test_llama_cpp_loads_the_export_and_agrees(source, tmp_path, name, tensor_type, tol, overrides):
    model = tiny(name, **overrides)
    out = save_gguf(model, source, tmp_path / "m.gguf", tensor_type)
    ids = ids_of(48)[0].tolist()
    theirs = llama_cpp_logits(out, ids)
    ours = logits(fake_quantized(model, TENSOR_TYPES[tensor_type]), torch.tensor([ids]))  # from the source model
    assert rel_err(theirs, ours) < tol
    assert (theirs.argmax(-1) == ours.argmax(-1)).float().mean() >= 0.9


@pytest.mark.real_model
def test_llama_cpp_runs_exported_smollm2_q8_0(smollm2_gguf, tmp_path):
    pytest.importorskip("llama_cpp")
    model, tok = load(smollm2_gguf)
    out = save_gguf(model, smollm2_gguf, tmp_path / "smol-q8_0.gguf", "q8_0")
    text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    ids = tok.encode(text, add_special_tokens=False)[:16]
    theirs, ours = llama_cpp_logits(out, ids), logits(model, torch.tensor([ids]))
    corr = np.corrcoef(theirs.flatten().numpy(), ours.flatten().numpy())[0, 1]
    assert corr > 0.995 and rel_err(theirs, ours) < 0.1
    assert (theirs.argmax(-1) == ours.argmax(-1)).float().mean() >= 0.8
    assert Tokenizer.from_gguf(out).encode(text, add_special_tokens=False)[:16] == ids
