"""BERT-style encoder: equals transformers' BertModel and BertForMaskedLM on the same weights (padding
masks, token types, both GELUs, untied heads), padding changes no real token, pooling is the mean over
real tokens or [CLS], the packed path on the fused kernels equals the padded forward, gradient
checkpointing changes no gradient, and bad inputs and configs fail with messages that name them."""

from __future__ import annotations

import pytest
import torch

from lmforge.config import Config
from lmforge.model import encoder_fused
from lmforge.model.encoder import Encoder, build_encoder, mean_pool, sentence_embedding
from lmforge.model.transformer import Transformer, build_model, model_class

transformers = pytest.importorskip("transformers")

VARIANTS = {
    "bert": dict(),
    "tanh-gelu-untied-one-type": dict(hidden_act="gelu_new", tie_word_embeddings=False, type_vocab_size=1),
    "math-attention": dict(),
}


def hf_pair(variant: str, **overrides):
    """A tiny random BertForMaskedLM and the lmforge Encoder holding the same tensors."""
    torch.manual_seed(0)
    cfg = transformers.BertConfig(**{**dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                            intermediate_size=48, max_position_embeddings=24), **VARIANTS[variant],
                                     **overrides})
    ref = transformers.BertForMaskedLM(cfg).eval()
    config = Config.from_name("tiny-bert", vocab_size=97, n_embd=32, n_head=4, intermediate_size=48, block_size=24,
                              mlp="gelu" if cfg.hidden_act == "gelu_new" else "gelu_erf",
                              type_vocab_size=cfg.type_vocab_size, tie_embeddings=cfg.tie_word_embeddings,
                              attn_impl="math" if variant == "math-attention" else "sdpa")
    model = Encoder(config).eval()
    state = {k.removeprefix("bert."): v for k, v in ref.state_dict().items()
             if k != "cls.predictions.decoder.bias" and not (cfg.tie_word_embeddings and "decoder.weight" in k)}
    model.load_state_dict(state, strict=True)
    return ref, model


def batch(vocab: int = 97, types: int = 2):
    """Three rows, two of them right-padded, with token type ids."""
    torch.manual_seed(1)
    ids = torch.randint(0, vocab, (3, 11))
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[1, 7:], mask[2, 2:] = 0, 0
    return ids, mask, torch.randint(0, types, (3, 11))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_hidden_states_and_mlm_logits_equal_transformers(variant):
    ref, model = hf_pair(variant)
    ids, mask, types = batch(types=ref.config.type_vocab_size)
    with torch.no_grad():
        out = ref(input_ids=ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True)
        hidden = model(ids, mask, types)
        real = mask.bool()
        torch.testing.assert_close(hidden[real], out.hidden_states[-1][real], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.mlm_logits(hidden)[real], out.logits[real], rtol=1e-5, atol=1e-5)


def test_padding_changes_no_real_token():
    _, model = hf_pair("bert")
    ids, mask, types = batch()
    with torch.no_grad():
        padded = model(ids, mask, types)
        for row in range(3):
            n = int(mask[row].sum())
            alone = model(ids[row:row + 1, :n], token_type_ids=types[row:row + 1, :n])
            torch.testing.assert_close(padded[row:row + 1, :n], alone, rtol=1e-5, atol=1e-5)


def test_pooling_mean_over_real_tokens_or_cls_and_unit_norm():
    hidden = torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    torch.testing.assert_close(mean_pool(hidden, mask)[0], hidden[0, :3].mean(0))
    torch.testing.assert_close(sentence_embedding(hidden, mask, "cls", normalize=False), hidden[:, 0])
    unit = sentence_embedding(hidden, mask, "mean")
    torch.testing.assert_close(unit.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(unit[1], hidden[1].mean(0) / hidden[1].mean(0).norm())
    with pytest.raises(ValueError, match="pooling='max'"):
        sentence_embedding(hidden, mask, "max")


needs_kernels = pytest.mark.skipif(not encoder_fused.usable(build_encoder(Config.from_name("tiny-bert"))),
                                   reason="lmforge's encoder kernels could not be built here")
PRECISIONS = ["fp32", pytest.param("bf16x3", marks=pytest.mark.skipif(
    encoder_fused.default_precision() != "bf16x3", reason="this CPU has no AMX-BF16 tiles"))]
TOLERANCE = {"fp32": 1e-5, "bf16x3": 1e-4}  # bf16x3 GEMMs are within ~5e-6 relative of fp32's


@needs_kernels
@pytest.mark.parametrize("overrides", [dict(), dict(n_embd=48, n_head=4, mlp="gelu"), dict(n_embd=96, n_head=2)],
                         ids=["head_dim-16", "head_dim-12-tanh", "head_dim-48"])
@pytest.mark.parametrize("pooling", ["mean", "cls"])
@pytest.mark.parametrize("precision", PRECISIONS)
def test_packed_fused_path_equals_padded_forward(overrides, pooling, precision):
    """n_embd 48 also runs its linears whose sides are not multiples of 32 on MKL under bf16x3."""
    torch.manual_seed(2)
    model = build_encoder(Config.from_name("tiny-bert", **overrides)).eval()
    lengths = [1, 3, 8, 9, 17, 40, 33]  # ragged: query blocks of 8 with tails, one-token sequences
    seqs = [torch.randint(0, 256, (n,)).tolist() for n in lengths]
    packed = encoder_fused.pack(seqs)
    fused = encoder_fused.fused_hidden_states(model, packed, precision)
    tol = 10 * TOLERANCE[precision]
    with torch.no_grad():
        for i, s in enumerate(seqs):
            alone = model(torch.tensor([s]))[0]
            torch.testing.assert_close(fused[packed.cu_seqlens[i]:packed.cu_seqlens[i + 1]], alone, rtol=tol, atol=tol)
    vectors = encoder_fused.sentence_embeddings(model, seqs, pooling, batch_size=3, precision=precision, max_tokens=50)
    padded = encoder_fused.sentence_embeddings(model, seqs, pooling, batch_size=3, fused=False)
    torch.testing.assert_close(vectors, padded, rtol=TOLERANCE[precision], atol=TOLERANCE[precision])


@needs_kernels
@pytest.mark.parametrize("precision", PRECISIONS)
def test_fused_weights_follow_changed_parameters(precision):
    """The fused path keeps its prepared (fused, packed) weights per model, and rebuilds them when a
    parameter changes in place."""
    model = build_encoder(Config.from_name("tiny-bert")).eval()
    seqs = [[1, 2, 3, 4], [5, 6]]
    before = encoder_fused.sentence_embeddings(model, seqs, precision=precision)
    with torch.no_grad():
        model.encoder.layer[0].intermediate.dense.weight.mul_(3.0)
    after = encoder_fused.sentence_embeddings(model, seqs, precision=precision)
    padded = encoder_fused.sentence_embeddings(model, seqs, fused=False)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, padded, rtol=TOLERANCE[precision], atol=TOLERANCE[precision])
    with pytest.raises(ValueError, match="precision='fp16' must be 'fp32' or 'bf16x3'"):
        encoder_fused.sentence_embeddings(model, seqs, precision="fp16")


def test_batches_hold_at_most_batch_size_sequences_and_max_tokens():
    lengths = [5, 1, 7, 3, 9, 2]
    order = sorted(range(6), key=lengths.__getitem__)
    assert encoder_fused.batches(order, lengths, 2, 100) == [[1, 5], [3, 0], [2, 4]]
    assert encoder_fused.batches(order, lengths, 10, 10) == [[1, 5, 3], [0], [2], [4]]


def test_gradient_checkpointing_changes_no_gradient():
    model = build_encoder(Config.from_name("tiny-bert"))
    ids, mask, _ = batch(vocab=256)
    grads = []
    for ckpt in (False, True):
        model.gradient_checkpointing = ckpt
        model.zero_grad()
        model.mlm_logits(model(ids, mask)).logsumexp(-1).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)


def test_input_longer_than_the_position_table_names_both_lengths():
    model = build_encoder(Config.from_name("tiny-bert", block_size=16)).eval()
    with pytest.raises(ValueError, match=r"sequence length 17 is longer than the position table .*16 positions"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match=r"sequence length 20 .*16 positions"):
        model.hidden_states(torch.zeros(1, 4, dtype=torch.long), positions=torch.tensor([[0, 1, 2, 19]]))
    if encoder_fused.usable(model):
        with pytest.raises(ValueError, match=r"sequence length 17 .*16 positions"):
            encoder_fused.sentence_embeddings(model, [[1] * 5, [2] * 17])


def test_rows_without_a_real_token_and_missing_heads_are_refused():
    model = build_encoder(Config.from_name("tiny-bert", mlm_head=False)).eval()
    with pytest.raises(ValueError, match=r"rows \[1\] have no real token"):
        model(torch.zeros(2, 3, dtype=torch.long), torch.tensor([[1, 1, 0], [0, 0, 0]]))
    with pytest.raises(ValueError, match="no masked-LM head"):
        model.mlm_logits(torch.zeros(1, 32))
    with pytest.raises(ValueError, match="non-empty token id lists"):
        encoder_fused.pack([[1, 2], []])
    assert not any(k.startswith("cls.") for k in model.state_dict())


@pytest.mark.parametrize("overrides, message", [
    (dict(position="rope"), "position='rope' with arch='encoder'"),
    (dict(norm="rmsnorm"), "norm='rmsnorm' with arch='encoder'"),
    (dict(n_kv_head=2), "n_kv_head=2 with arch='encoder'"),
    (dict(bias=False), "bias=False with arch='encoder'"),
    (dict(mlp="swiglu"), "mlp='swiglu' with arch='encoder'"),
    (dict(qk_norm=True), "qk_norm=True with arch='encoder'"),
    (dict(sliding_window=8), "sliding_window=8 with arch='encoder'"),
    (dict(type_vocab_size=-1), "type_vocab_size=-1 must be >= 0"),
])
def test_config_refuses_what_an_encoder_cannot_build(overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Config.from_name("tiny-bert", **overrides)


def test_builders_pick_the_encoder_and_the_decoder_refuses_it():
    config = Config.from_name("tiny-bert")
    assert model_class(config) is Encoder and isinstance(build_model(config), Encoder)
    with pytest.raises(ValueError, match="arch='encoder'"):
        Transformer(config)
    with pytest.raises(ValueError, match="Encoder builds arch='encoder' configs"):
        Encoder(Config.from_name("tiny-llama"))
