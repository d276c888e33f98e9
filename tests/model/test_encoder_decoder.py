"""T5 encoder-decoder: logits equal transformers' T5ForConditionalGeneration loaded through
load_model from its save_pretrained folder (ReLU and gated-GELU, tied and untied, with encoder
padding), the relative position buckets equal theirs, and bad checkpoints, configs and inputs fail
with messages that name them."""

from __future__ import annotations

import pytest
import torch

from lmforge.checkpoint.errors import CheckpointError
from lmforge.checkpoint.load import assign_state, load_model
from lmforge.config import Config
from lmforge.model.encoder_decoder import EncoderDecoder, build_encoder_decoder, relative_position_bucket
from lmforge.model.transformer import build_model, model_class

transformers = pytest.importorskip("transformers")

VARIANTS = {
    "relu-tied": dict(feed_forward_proj="relu", tie_word_embeddings=True),
    "relu-untied": dict(feed_forward_proj="relu", tie_word_embeddings=False),
    "gated-gelu-tied": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=True),
    "gated-gelu-untied": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False),
}


def hf_t5(variant: str, path, std: float | None = None, **overrides):
    """A tiny random T5ForConditionalGeneration saved to `path`. With `std` every weight is redrawn
    as normal(0, std) so greedy outputs vary token to token (HF's init repeats one token)."""
    torch.manual_seed(0)
    cfg = transformers.T5Config(**{**dict(vocab_size=101, d_model=32, d_kv=8, d_ff=48, num_layers=2,
                                          num_decoder_layers=3, num_heads=4, relative_attention_num_buckets=8,
                                          relative_attention_max_distance=20, dropout_rate=0.0,
                                          decoder_start_token_id=0, pad_token_id=0, eos_token_id=1),
                                     **VARIANTS[variant], **overrides})
    ref = transformers.T5ForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # HF inits norms to 1; make them count
        for name, p in ref.named_parameters():
            if "layer_norm" in name:
                p.uniform_(0.5, 1.5)
            elif std is not None:
                p.normal_(0.0, std)
    ref.save_pretrained(path, safe_serialization=True)
    return ref


def inputs(vocab: int = 101):
    torch.manual_seed(1)
    ids = torch.randint(2, vocab, (2, 30))
    mask = torch.ones(2, 30, dtype=torch.long)
    mask[1, 21:] = 0  # the second row is padded
    dec = torch.randint(2, vocab, (2, 25))
    dec[:, 0] = 0
    return ids, mask, dec


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_equal_transformers(variant, tmp_path):
    ref = hf_t5(variant, tmp_path)
    model = load_model(tmp_path)
    assert isinstance(model, EncoderDecoder)
    assert model.config.mlp == ("relu" if "relu" in variant else "geglu")
    assert model.config.tie_embeddings == ("untied" not in variant)
    ids, mask, dec = inputs()
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        got = model(ids, dec, mask)
        enc_want = ref.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        enc_got = model.encode(ids, mask)
    torch.testing.assert_close(enc_got[mask.bool()], enc_want[mask.bool()], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_padding_changes_no_real_token(tmp_path):
    hf_t5("relu-tied", tmp_path)
    model = load_model(tmp_path)
    ids, mask, dec = inputs()
    with torch.no_grad():
        padded = model(ids[1:], dec[1:], mask[1:])
        alone = model(ids[1:, :21], dec[1:])
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bidirectional", [True, False])
def test_buckets_equal_transformers(bidirectional):
    from transformers.models.t5.modeling_t5 import T5Attention

    rel = torch.arange(-300, 300)[None, :] - torch.arange(0, 5)[:, None]
    want = T5Attention._relative_position_bucket(rel, bidirectional=bidirectional, num_buckets=32, max_distance=128)
    assert torch.equal(relative_position_bucket(rel, bidirectional, 32, 128), want)


def test_preset_builds_and_dispatches():
    config = Config.from_name("tiny-t5")
    assert model_class(config) is EncoderDecoder
    model = build_model(config)
    ids = torch.randint(0, 256, (1, 7))
    assert model(ids, ids[:, :3]).shape == (1, 3, 256)
    assert not hasattr(model.decoder.block[1].layer[0].SelfAttention, "relative_attention_bias")


def test_t5_checkpoint_into_a_decoder_config_is_refused(tmp_path):
    ref = hf_t5("relu-tied", tmp_path)
    state = {k: v for k, v in ref.state_dict().items()}
    with pytest.raises(CheckpointError, match="T5 checkpoint"):
        assign_state(Config.from_name("tiny-llama"), state, "t5-folder")


def test_bad_config_json_is_refused(tmp_path):
    hf_t5("relu-tied", tmp_path)
    cfg = (tmp_path / "config.json").read_text().replace('"relu"', '"gated-silu"')
    (tmp_path / "config.json").write_text(cfg)
    with pytest.raises(CheckpointError, match="feed_forward_proj='gated-silu'"):
        load_model(tmp_path)


def test_input_past_block_size_is_refused():
    model = build_encoder_decoder(Config.from_name("tiny-t5", block_size=16))
    with pytest.raises(ValueError, match="input length 17 is longer than block_size=16"):
        model.encode(torch.zeros(1, 17, dtype=torch.long))
    encoded = model.encode(torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="decoder length 17"):
        model.decode(torch.zeros(1, 17, dtype=torch.long), model.cross_kv(encoded))


@pytest.mark.parametrize("overrides, message", [
    (dict(position="rope"), "position='rope' with arch='encoder_decoder'"),
    (dict(mlp="swiglu"), "mlp='swiglu' with arch='encoder_decoder'"),
    (dict(relative_attention_num_buckets=2), "relative_attention_num_buckets=2"),
    (dict(n_decoder_layer=0), "n_decoder_layer=0"),
])
def test_bad_configs_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        Config.from_name("tiny-t5", **overrides)


def test_t5_choices_refused_outside_encoder_decoder():
    with pytest.raises(ValueError, match="mlp='relu' is T5's"):
        Config.from_name("tiny-llama", mlp="relu")


def test_cached_decode_equals_full_prefix(tmp_path):
    hf_t5("gated-gelu-tied", tmp_path)
    model = load_model(tmp_path)
    ids, mask, dec = inputs()
    with torch.no_grad():
        full = model(ids, dec, mask)
        cross = model.cross_kv(model.encode(ids, mask))
        cache: list = []
        steps = [model.decode(dec[:, :10], cross, mask, cache=cache)]  # a prefix, then one token at a time
        steps += [model.decode(dec[:, t:t + 1], cross, mask, cache=cache) for t in range(10, dec.shape[1])]
    assert cache[0][0].shape[2] == dec.shape[1]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", ["relu-tied", "gated-gelu-untied"])
def test_greedy_equals_transformers_generate(variant, tmp_path):
    from lmforge.generation.seq2seq import greedy_seq2seq

    ref = hf_t5(variant, tmp_path, std=0.6)
    model = load_model(tmp_path)
    ids, mask, _ = inputs()
    # use_cache=False: transformers 5's cache is sized by num_layers and fails with 3 decoder layers over 2
    want = ref.generate(input_ids=ids, attention_mask=mask, do_sample=False, num_beams=1, max_new_tokens=12,
                        use_cache=False)
    got = greedy_seq2seq(model, ids, mask, max_new_tokens=12, eos_id=1, pad_id=0)
    assert len(set(got[:, 1:].flatten().tolist())) > 4  # not one repeated token
    assert torch.equal(got, want)


def test_greedy_stops_rows_at_eos(tmp_path):
    from lmforge.generation.seq2seq import greedy_seq2seq

    hf_t5("relu-tied", tmp_path, std=0.6)
    model = load_model(tmp_path)
    ids, mask, _ = inputs()
    free = greedy_seq2seq(model, ids, mask, max_new_tokens=6, eos_id=None)
    eos = int(free[0, 2])  # pretend the first row's second token ends it
    assert eos not in free[0, :2].tolist() and eos not in free[1].tolist()
    out = greedy_seq2seq(model, ids, mask, max_new_tokens=6, eos_id=eos, pad_id=0)
    assert torch.equal(out[0, :3], free[0, :3]) and bool((out[0, 3:] == 0).all())
    assert torch.equal(out[1], free[1])  # the other row runs on
    with pytest.raises(ValueError, match="decoder length 600"):
        greedy_seq2seq(model, ids, mask, max_new_tokens=599)


def test_own_lm_head_of_t5_v1_1_hub_files_is_read(tmp_path):
    """Hub T5 v1.1 files (written by transformers 4) keep lm_head.weight apart from shared and say
    tie_word_embeddings=false: the head is that tensor, unscaled."""
    import json

    from safetensors.torch import load_file, save_file

    hf_t5("gated-gelu-tied", tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state["lm_head.weight"] = torch.randn_like(state["shared.weight"])
    save_file(state, tmp_path / "model.safetensors")
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.pop("scale_decoder_outputs")
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": False}))
    model = load_model(tmp_path)
    assert not model.config.tie_embeddings
    torch.testing.assert_close(model.lm_head.weight, state["lm_head.weight"])
    with torch.no_grad():
        h = torch.randn(2, 3, 32)
        torch.testing.assert_close(model.logits(h), h @ state["lm_head.weight"].T)


@pytest.mark.parametrize("row, num_beams, length_penalty, early_stopping", [
    (0, 3, 1.0, False), (1, 4, 0.5, True), (1, 2, 2.0, "never"),
])
def test_beam_search_equals_transformers(row, num_beams, length_penalty, early_stopping, tmp_path):
    from lmforge.generation.sampling import SamplingParams
    from lmforge.generation.seq2seq import beam_search_seq2seq, greedy_seq2seq

    ref = hf_t5("gated-gelu-tied", tmp_path, std=0.6)
    model = load_model(tmp_path)
    ids, mask, _ = inputs()
    ids, mask = ids[row:row + 1], mask[row:row + 1]  # the second row keeps its padding
    eos = int(greedy_seq2seq(model, ids, mask, max_new_tokens=4, eos_id=None)[0, 3])  # a token beams reach
    want = ref.generate(input_ids=ids, attention_mask=mask, do_sample=False, num_beams=num_beams,
                        max_new_tokens=10, length_penalty=length_penalty, early_stopping=early_stopping,
                        eos_token_id=eos, use_cache=False, num_return_sequences=num_beams)
    params = SamplingParams(max_new_tokens=10, num_beams=num_beams, length_penalty=length_penalty, temperature=0,
                            early_stopping=early_stopping)
    best = beam_search_seq2seq(model, ids, params, {eos}, mask)
    assert len(best) == num_beams and len({tuple(h.tokens) for h in best}) == num_beams
    got = torch.full_like(want, eos)  # transformers pads ended hypotheses with the eos given to generate
    got[:, 0] = 0
    for i, hyp in enumerate(best):
        got[i, 1:1 + len(hyp.tokens)] = torch.tensor(hyp.tokens)
    assert torch.equal(got, want)  # every hypothesis, in score order


@pytest.mark.parametrize("mlp, tied", [("relu", True), ("geglu", False)])
def test_save_hf_round_trips(mlp, tied, tmp_path):
    """save_hf writes a folder load_model reads back to the same logits, and transformers reads the
    tied one to the same logits too (transformers 5 always ties the head, so not the untied one)."""
    from lmforge.checkpoint.hf import save_hf

    torch.manual_seed(0)
    config = Config.from_name("tiny-t5", mlp=mlp, tie_embeddings=tied, n_decoder_layer=3)
    model = build_encoder_decoder(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.uniform_(0.5, 1.5)
    save_hf(model, tmp_path)
    ids, mask, dec = inputs(vocab=256)
    again = load_model(tmp_path)
    assert again.config.mlp == mlp and again.config.tie_embeddings == tied and again.config.n_decoder_layer == 3
    with torch.no_grad():
        want = model(ids, dec, mask)
        torch.testing.assert_close(again(ids, dec, mask), want, atol=1e-6, rtol=1e-6)
        if tied:
            ref = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path).eval()
            got = ref(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_bfloat16_load_stays_close(tmp_path):
    """Loaded in bf16 (norms computed in fp32, -inf padding bias cast to bf16), logits stay near fp32's."""
    hf_t5("gated-gelu-tied", tmp_path)
    full, half = load_model(tmp_path), load_model(tmp_path, dtype=torch.bfloat16)
    ids, mask, dec = inputs()
    with torch.no_grad():
        want, got = full(ids, dec, mask), half(ids, dec, mask)
    assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), want, atol=0.15, rtol=0.05)
    assert (got.float().argmax(-1) == want.argmax(-1)).float().mean() > 0.95
