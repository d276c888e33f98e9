"""Garbage detection per paragraph: interpretable features, a rule score, a learned classifier.

Each paragraph gets a feature vector (symbol and digit ratios, word-length statistics, share
of dictionary-like and of function words, repetition, line-length shape). Hand-set rules
turn features into penalties, each named as a reason; the rule score is
``1 - exp(-sum(weight * penalty))``. Once a reviewer has labelled paragraphs, a logistic
regression (scikit-learn) on the same features is trained and blended in with weight
``n / (n + prior_labels)``, so a handful of labels nudges and many labels decide. The model
is stored as JSON (coefficients and scaling), never pickled.
"""

from __future__ import annotations

import math
import re
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from lmforge.atomic import atomic_write_json
from lmforge.data.io import read_json

FEATURES = ("symbol_ratio", "digit_ratio", "upper_ratio", "mean_word_len", "std_word_len", "long_word_ratio",
            "short_word_ratio", "wordlike_ratio", "stopword_ratio", "repetition", "compress_ratio",
            "mean_line_len", "short_line_ratio", "log_words")
STOPWORDS = frozenset("""a about above after again all also an and any are as at be because been before being
below between both but by can could did do does doing down during each few for from further had has have having
he her here hers him his how i if in into is it its itself just may me might more most must my no nor not now of
off on once only or other our out over own same she should so some such than that the their them then there these
they this those through to too under until up very was we were what when where which while who whom why will with
would you your one two first see use used using given each""".split())
WORD = re.compile(r"\S+")
WORDLIKE = re.compile(r"^[A-Za-z][a-z]*(?:['’-][a-z]+)?$")
CONSONANT_RUN = re.compile(r"[bcdfghjklmnpqrstvwxz]{5,}", re.I)


def features(text: str, line_lengths: list[int] | None = None) -> dict[str, float]:
    """The interpretable feature vector of one paragraph."""
    n = max(len(text), 1)
    letters = sum(c.isalpha() for c in text)
    words = WORD.findall(text)
    bare = [w.strip(".,;:!?()[]{}\"'‘’“”") for w in words] or [""]
    lengths = np.array([len(w) for w in bare], dtype=float)
    lines = line_lengths or [len(text)]
    return {
        "symbol_ratio": sum(not c.isalnum() and not c.isspace() for c in text) / n,
        "digit_ratio": sum(c.isdigit() for c in text) / n,
        "upper_ratio": sum(c.isupper() for c in text) / max(letters, 1),
        "mean_word_len": float(lengths.mean()),
        "std_word_len": float(lengths.std()),
        "long_word_ratio": float((lengths > 20).mean()),
        "short_word_ratio": float((lengths <= 1).mean()),
        "wordlike_ratio": sum(_wordlike(w) for w in bare) / len(bare),
        "stopword_ratio": sum(w.lower() in STOPWORDS for w in bare) / len(bare),
        "repetition": 1 - len({w.lower() for w in bare}) / len(bare),
        "compress_ratio": len(zlib.compress(text.encode("utf-8"))) / max(len(text.encode("utf-8")), 1),
        "mean_line_len": float(np.mean(lines)),
        "short_line_ratio": float(np.mean([x < 20 for x in lines])),
        "log_words": math.log1p(len(words)),
    }


def _wordlike(word: str) -> bool:
    """A word that looks like it is in a dictionary: letters, a vowel, no long consonant run."""
    return (WORDLIKE.match(word) is not None and 2 <= len(word) <= 18 and any(v in word.lower() for v in "aeiouy")
            and not CONSONANT_RUN.search(word)) or word.lower() in ("a", "i")


# (feature, direction, threshold, full-penalty distance, weight, minimum words for the rule)
RULES = (
    ("symbol_ratio", ">", 0.20, 0.20, 2.5, 1),
    ("digit_ratio", ">", 0.30, 0.30, 2.0, 1),
    ("wordlike_ratio", "<", 0.55, 0.35, 3.0, 3),
    ("stopword_ratio", "<", 0.08, 0.08, 1.2, 15),
    ("mean_word_len", ">", 11.0, 8.0, 2.0, 1),
    ("long_word_ratio", ">", 0.15, 0.30, 2.0, 3),
    ("short_word_ratio", ">", 0.35, 0.30, 1.5, 6),
    ("repetition", ">", 0.65, 0.25, 2.0, 10),
    ("compress_ratio", "<", 0.25, 0.15, 2.0, 40),
    ("short_line_ratio", ">", 0.75, 0.25, 1.0, 12),
)


def rule_score(feats: dict[str, float]) -> tuple[float, list[str]]:
    """Rule-based garbage score in [0, 1) and the reasons (features beyond their threshold)."""
    n_words = math.expm1(feats["log_words"])
    total, reasons = 0.0, []
    for name, direction, threshold, span, weight, min_words in RULES:
        value = feats[name]
        excess = value - threshold if direction == ">" else threshold - value
        if n_words < min_words or excess <= 0:
            continue
        penalty = min(excess / span, 1.0)
        total += weight * penalty
        reasons.append(f"{name}={value:.2f} {direction} {threshold:g}")
    return 1.0 - math.exp(-total), reasons


@dataclass
class GarbageModel:
    """A logistic regression on the standardized features, kept as plain numbers (JSON)."""

    features: list[str]
    mean: list[float]
    scale: list[float]
    coef: list[float]
    intercept: float
    n_keep: int
    n_discard: int

    @property
    def n_labels(self) -> int:
        return self.n_keep + self.n_discard

    def predict(self, feats: list[dict[str, float]]) -> np.ndarray:
        """P(garbage) for each feature dict."""
        x = np.array([[f[name] for name in self.features] for f in feats], dtype=float).reshape(len(feats), -1)
        z = ((x - np.array(self.mean)) / np.array(self.scale)) @ np.array(self.coef) + self.intercept
        return 1.0 / (1.0 + np.exp(-z))

    def save(self, path: str | Path) -> None:
        """Write the model as JSON, atomically."""
        atomic_write_json(path, asdict(self))

    @classmethod
    def load(cls, path: str | Path) -> "GarbageModel | None":
        """The saved model, or None when there is none yet."""
        data = read_json(path)
        if data is None:
            return None
        if data.get("features") != list(FEATURES):
            raise ValueError(f"{path}: model features {data.get('features')} differ from {list(FEATURES)}; "
                             "delete the file to retrain from the labels")
        return cls(**data)


def train(feats: list[dict[str, float]], labels: list[bool]) -> GarbageModel | None:
    """Fit P(garbage) on reviewed paragraphs (True = discard); None until both classes have 2 labels."""
    y = np.array(labels, dtype=int)
    if y.sum() < 2 or (1 - y).sum() < 2:
        return None
    from sklearn.linear_model import LogisticRegression

    x = np.array([[f[name] for name in FEATURES] for f in feats], dtype=float)
    mean, scale = x.mean(axis=0), x.std(axis=0)
    scale[scale == 0] = 1.0
    clf = LogisticRegression(C=1.0, class_weight="balanced", max_iter=1000).fit((x - mean) / scale, y)
    return GarbageModel(list(FEATURES), mean.tolist(), scale.tolist(), clf.coef_[0].tolist(),
                        float(clf.intercept_[0]), int((1 - y).sum()), int(y.sum()))


@dataclass(frozen=True)
class GarbageConfig:
    """Threshold on the final score, and how many labels the model needs to count fully."""

    threshold: float = 0.5
    prior_labels: int = 20  # model weight is n / (n + prior_labels)
    min_chars: int = 20  # shorter paragraphs (headings, captions) are not scored

    def __post_init__(self) -> None:
        if not 0 < self.threshold < 1:
            raise ValueError(f"garbage threshold must be in (0, 1), got {self.threshold}")


def score(feats: list[dict[str, float]], model: GarbageModel | None,
          config: GarbageConfig = GarbageConfig()) -> list[tuple[float, list[str]]]:
    """Final score and reasons per paragraph: the rule score, blended with the model's when trained."""
    rules = [rule_score(f) for f in feats]
    if model is None or not feats:
        return rules
    weight = model.n_labels / (model.n_labels + config.prior_labels)
    probs = model.predict(feats)
    return [((1 - weight) * s + weight * float(p), reasons + [f"model p={p:.2f} (w={weight:.2f})"])
            for (s, reasons), p in zip(rules, probs)]
