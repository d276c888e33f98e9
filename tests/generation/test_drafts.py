"""Drafts: n-gram lookup proposals, a model draft's cache kept in step, and the checks at the boundary."""

from __future__ import annotations

import pytest
import torch

from lmforge.cli import main
from lmforge.config import Config
from lmforge.generation.drafts import (ModelDraft, NgramDraft, check_compatible, parse_speculative,
                                       tokenizer_fingerprint)
from lmforge.generation.generate import generate_ids
from lmforge.generation.sampling import SamplingParams, apply_repetition_penalty, token_probabilities
from lmforge.generation.speculative import DraftLength, SpeculativeStream
from lmforge.model.transformer import build_model, init_weights

GREEDY = SamplingParams(temperature=0)


def tiny(seed: int, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model(Config.from_name("tiny-llama", **overrides)).eval()
    init_weights(model, std=0.2)
    return model


class TableTokenizer:
    """Just enough of a tokenizer for the identity check: a vocabulary size and an id -> token table."""

    def __init__(self, tokens: list[str]) -> None:
        self.tokens, self.vocab_size = tokens, len(tokens)

    def id_to_token(self, token_id: int) -> str:
        return self.tokens[token_id]


def test_ngram_proposes_what_followed_the_latest_match_of_the_longest_ngram():
    draft = NgramDraft(max_ngram=3, min_ngram=1)
    #          0  1  2  3  4  5  6  7  8  9
    context = [1, 2, 3, 4, 9, 2, 3, 5, 6, 2, 3]  # tail (2, 3): latest earlier match at 5 -> 5, 6, ...
    assert draft.propose(context, 3, GREEDY).tokens == [5, 6, 2]
    assert draft.propose([1, 2, 3, 4, 9, 2, 3, 5, 1, 2, 3], 2, GREEDY).tokens == [4, 9]  # (1, 2, 3) beats (2, 3)
    assert draft.propose([1, 2, 3, 4, 3], 4, GREEDY).tokens == [4, 3]  # only the unigram (3) matches; ends early
    assert draft.propose([1, 2, 3, 4], 4, GREEDY) .tokens == []  # no match: a plain step
    assert draft.propose([7], 4, GREEDY).tokens == [] and draft.propose([7, 7], 4, GREEDY).tokens == [7]
    assert draft.propose(context, 3, GREEDY).probs is None  # deterministic: q is one-hot
    assert NgramDraft().propose([1, 2, 3, 4, 3], 4, GREEDY).tokens == []  # by default a lone token is no match
    with pytest.raises(ValueError, match="1 <= min_ngram <= max_ngram"):
        NgramDraft(max_ngram=2, min_ngram=3)


def test_model_draft_greedy_proposals_are_the_draft_models_greedy_continuation():
    model, draft = tiny(0), ModelDraft(tiny(0))
    context = [5, 9, 2, 7, 7, 1]
    assert draft.propose(context, 6, GREEDY).tokens == generate_ids(model, [context],
                                                                     SamplingParams(max_new_tokens=6, temperature=0))[0]


def test_model_draft_after_a_rejection_equals_a_fresh_draft():
    draft, fresh = ModelDraft(tiny(0)), ModelDraft(tiny(0))
    context = [5, 9, 2, 7, 7, 1]
    guess = draft.propose(context, 5, GREEDY).tokens
    draft.rollback(len(context) + 2)  # the target kept two guesses, then chose its own token
    assert draft.cache.length == len(context) + 2 and draft.seen == context + guess[:2]
    after = context + guess[:2] + [(guess[2] + 1) % 256]
    assert draft.propose(after, 4, GREEDY).tokens == fresh.propose(after, 4, GREEDY).tokens
    other = [3, 3, 3]  # a new prompt shares nothing: the cache restarts from slot 0
    assert draft.propose(other, 4, GREEDY).tokens == ModelDraft(tiny(0)).propose(other, 4, GREEDY).tokens


def test_model_draft_samples_from_its_own_warped_distribution():
    model = tiny(0)
    params = SamplingParams(temperature=0.8, top_k=20, repetition_penalty=1.2)
    context = [5, 9, 2, 7, 7, 1]
    proposal = ModelDraft(model).propose(context, 3, params, torch.Generator().manual_seed(0))
    assert proposal.probs.shape == (3, 256) and len(proposal.tokens) == 3
    with torch.no_grad():
        ids = torch.tensor([context + proposal.tokens[:2]])
        logits = model(ids)[0, len(context) - 1:].float()  # after the context, then after each guess
    for j in range(3):
        history = torch.tensor([context + proposal.tokens[:j]])
        want = token_probabilities(apply_repetition_penalty(logits[j:j + 1], history, 1.2), params)[0]
        torch.testing.assert_close(proposal.probs[j], want, rtol=1e-4, atol=1e-6)
        assert proposal.probs[j, proposal.tokens[j]] > 0


@pytest.mark.parametrize("k", [0, 17, -1, 2.5])
def test_draft_tokens_outside_1_to_16_are_refused(k):
    with pytest.raises(ValueError, match=r"must be an integer in 1\.\.16"):
        NgramDraft(k=k)
    with pytest.raises(ValueError, match=r"must be an integer in 1\.\.16"):
        ModelDraft(tiny(0), k=k)


def test_adaptive_length_grows_on_full_acceptance_and_shrinks_otherwise():
    length = DraftLength(None)
    assert length.k == 4
    length.update(4, 4)
    length.update(6, 6)
    assert length.k == 8
    length.update(8, 3)
    assert length.k == 7
    length.update(0, 0)  # no guess: no change
    assert length.k == 7
    for _ in range(10):
        length.update(length.k, length.k)
    assert length.k == 16
    fixed = DraftLength(3)
    fixed.update(3, 0)
    assert fixed.k == 3


def test_a_draft_with_another_vocabulary_is_refused_naming_both():
    target, draft = tiny(0), ModelDraft(tiny(1, vocab_size=128), name="small-draft")
    with pytest.raises(ValueError, match="draft small-draft has a vocabulary of 128 tokens but the target "
                                         "model tiny-llama has 256"):
        SpeculativeStream(target, [[1, 2]], GREEDY, set(), draft=draft)


def test_a_draft_with_another_tokenizer_is_refused():
    target = tiny(0)
    ours = TableTokenizer([f"t{i}" for i in range(256)])
    theirs = TableTokenizer([f"t{i}" for i in range(255)] + ["other"])
    assert tokenizer_fingerprint(ours) == tokenizer_fingerprint(TableTokenizer(list(ours.tokens)))
    check_compatible(ModelDraft(tiny(1), TableTokenizer(list(ours.tokens))), target, ours)  # same table: fine
    with pytest.raises(ValueError, match=r"has tokenizer [0-9a-f]{12} \(256 tokens\) but the target model "
                                         r"tiny-llama has tokenizer [0-9a-f]{12}"):
        check_compatible(ModelDraft(tiny(1), theirs, name="d"), target, ours)


def test_speculative_strings_parse_or_name_the_accepted_forms():
    assert parse_speculative("ngram") == ("ngram", None)
    assert parse_speculative("model:runs/int4") == ("model", "runs/int4")
    for bad in ("model", "model:", "ngrams", "lookup:x"):
        with pytest.raises(ValueError, match="use 'ngram' .* or 'model:PATH'"):
            parse_speculative(bad)


@pytest.mark.parametrize("argv, message", [
    (["generate", "hi", "--speculative", "medusa"], "use 'ngram'"),
    (["generate", "hi", "--speculative", "ngram", "--draft-tokens", "0"], "must be an integer in 1..16"),
    (["chat", "--speculative", "ngram", "--draft-tokens", "17"], "must be an integer in 1..16"),
    (["generate", "hi", "--draft-tokens", "4"], "--draft-tokens needs --speculative"),
    (["generate", "hi", "--speculative", "ngram", "--num-beams", "2"], "not with --num-beams"),
])
def test_cli_refuses_bad_speculative_flags_before_loading_a_model(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err
