"""Garbage detection: interpretable rule score with reasons, a classifier trained from labels, JSON model."""

from __future__ import annotations

import json
import random

import pytest

from lmforge.data.garbage import FEATURES, GarbageConfig, GarbageModel, features, rule_score, score, train

PROSE = [
    "Language models learn from large amounts of text, and the quality of that text matters a great deal.",
    "Every page is read from the text layer of the file, and pages without one are sent to recognition.",
    "The results show that the method works well on most of the documents that we have tested so far.",
    "In this section we describe how the data was collected and which steps were taken to clean it.",
]
GARBAGE = [
    "%#@! 8f9g 0x3F ^^&& ]]{{ ~~~ 4j2k@@ 77$$ q#1 zz@9 ##!% }{][ 3$4% ..",
    "|| -- || -- 0101 1110 0011 ## ## ## %% %% %% 7777 $$$$ @@@@ !!!! ????.",
    "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30",
    "xkcdqwrtz bnmvcxzlkj hgfdsapoiu ytrewqzxcv mnbvcxzlkj qwrtyplkjhg zxcvbnmlkj",
    "the the the the the the the the the the the the the the the the the the the the the the",
]


def test_features_are_all_present_and_finite():
    f = features(PROSE[0], [60, 40])
    assert set(f) == set(FEATURES)
    assert all(isinstance(v, float) and v == v for v in f.values())


@pytest.mark.parametrize("text", PROSE)
def test_prose_scores_low(text):
    s, reasons = rule_score(features(text))
    assert s < 0.5, reasons


@pytest.mark.parametrize("text", GARBAGE)
def test_garbage_scores_high_with_reasons(text):
    s, reasons = rule_score(features(text))
    assert s >= 0.5 and reasons
    assert all(r.split("=")[0] in FEATURES for r in reasons)


def test_train_needs_both_classes():
    feats = [features(t) for t in PROSE]
    assert train(feats, [False] * len(feats)) is None


def test_trained_model_round_trips_as_json_and_separates(tmp_path):
    texts = PROSE + GARBAGE
    labels = [False] * len(PROSE) + [True] * len(GARBAGE)
    model = train([features(t) for t in texts], labels)
    assert model is not None and model.n_labels == len(texts)
    path = tmp_path / "model.json"
    model.save(path)
    assert json.loads(path.read_text())["features"] == list(FEATURES)
    again = GarbageModel.load(path)
    probs = again.predict([features(t) for t in texts])
    assert (probs[len(PROSE):] > 0.5).all() and (probs[:len(PROSE)] < 0.5).all()


def test_labels_change_the_decision():
    """A reviewer who keeps 'garbage-looking' tables teaches the model to keep them."""
    rng = random.Random(0)
    tables = [" ".join(f"{rng.randint(0, 999)}.{rng.randint(0, 99)}" for _ in range(12)) for _ in range(30)]
    junk = ["".join(rng.choice("#$%^&*@!~|") for _ in range(40)) for _ in range(30)]
    feats = [features(t) for t in tables + junk]
    before = score([features(tables[0])], None)[0][0]
    model = train(feats, [False] * 30 + [True] * 30)
    after = score([features(tables[0])], model, GarbageConfig(prior_labels=5))[0][0]
    assert before >= 0.5 > after


def test_model_with_other_features_is_rejected(tmp_path):
    path = tmp_path / "model.json"
    path.write_text(json.dumps({"features": ["x"], "mean": [0], "scale": [1], "coef": [1], "intercept": 0,
                                "n_keep": 1, "n_discard": 1}))
    with pytest.raises(ValueError, match="differ"):
        GarbageModel.load(path)
