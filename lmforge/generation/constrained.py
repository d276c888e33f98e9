"""Constrained decoding: a grammar masks each step's logits so the output always parses.

A `Constraint` names what the output must be (a JSON Schema, any JSON object, a regular expression, one
of a fixed list of strings, or a GBNF/Lark grammar). llguidance (a Rust engine; chosen by measured speed
and error reporting, docs/structured_output.md) compiles it once per (tokenizer, constraint) and keeps
one matcher per sequence; `GrammarState` wraps that matcher (mask, advance, fork, rollback) and
`ConstrainedBatch` fills a batch's masks -- on a worker thread while the model runs its forward.
Stop tokens (EOS, end of turn) are allowed exactly when the grammar accepts what was generated.
"""

from __future__ import annotations

import json
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal, Sequence

import torch

KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")
# JSON output layout: no free whitespace (a random model could otherwise emit spaces forever), json.dumps's
# separators; lenient=False makes a keyword the engine cannot enforce an error rather than ignored.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ", "lenient": False}


@dataclass(frozen=True)
class Constraint:
    """What the output must match. kind: json_schema (value: a schema dict or its JSON text), json_object
    (any JSON object; no value), regex (value: a pattern, Rust `regex` syntax, matched whole), choice
    (value: a list of strings), grammar (value: GBNF as llama.cpp writes it, or Lark text)."""

    kind: Literal["json_schema", "json_object", "regex", "choice", "grammar"]
    value: Any = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown constraint kind {self.kind!r}; use one of {', '.join(KINDS)}")
        if self.kind == "json_schema":
            object.__setattr__(self, "value", _checked_schema(self.value))
        elif self.kind == "choice":
            if not (isinstance(self.value, (list, tuple)) and self.value
                    and all(isinstance(c, str) and c for c in self.value)):
                raise ValueError(f"a choice constraint needs a non-empty list of non-empty strings; got {self.value!r}")
            object.__setattr__(self, "value", tuple(self.value))
        elif self.kind in ("regex", "grammar") and not (isinstance(self.value, str) and self.value.strip()):
            raise ValueError(f"a {self.kind} constraint needs its text as a non-empty string; got {self.value!r}")

    def key(self) -> str:
        """A canonical text of the constraint: the compile cache's key."""
        return json.dumps([self.kind, self.value])  # key order kept: JSON output follows the schema's order

    def grammar(self) -> str:
        """The llguidance grammar this constraint compiles to (ValueError if llguidance rejects the text)."""
        return _grammar_text(self.key())


def _checked_schema(value: Any) -> dict:
    """A JSON Schema as a dict, checked against its meta-schema (jsonschema, when installed)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"the JSON Schema is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise ValueError(f"a JSON Schema must be an object (a dict); got {type(value).__name__}")
    try:
        import jsonschema
    except ImportError:  # the engine still rejects what it cannot read
        return value
    try:
        jsonschema.validators.validator_for(value).check_schema(value)
    except jsonschema.SchemaError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "(root)"
        raise ValueError(f"invalid JSON Schema at {where}: {e.message}") from None
    return value


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise ImportError("constrained decoding needs llguidance: pip install llguidance") from None
    return llguidance


@lru_cache(maxsize=256)
def _grammar_text(key: str) -> str:
    """Constraint key -> llguidance grammar (JSON text); the conversion errors become ValueError."""
    llg = _llguidance()
    kind, value = json.loads(key)
    try:
        if kind in ("json_schema", "json_object"):
            schema = {"type": "object"} if kind == "json_object" else value
            return llg.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
        if kind == "regex":
            return llg.LLMatcher.grammar_from_regex(value)
        if kind == "choice":
            return llg.grammar_from("choice", value)
        return llg.grammar_from("grammar", value)  # GBNF is converted to Lark; Lark passes through
    except ValueError as e:
        raise ValueError(f"invalid {kind} constraint: {e}") from None


_TOKENIZERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def engine_tokenizer(tokenizer):
    """The llguidance view of an lmforge Tokenizer (about a second to build, so kept per tokenizer)."""
    found = _TOKENIZERS.get(tokenizer)
    if found is None:
        llg = _llguidance()
        eos = tokenizer.eos_id if tokenizer.eos_id is not None else min(tokenizer.stop_ids, default=0)
        found = llg.LLTokenizer(tokenizer.backend.to_str(), n_vocab=tokenizer.vocab_size, eos_token=eos)
        _TOKENIZERS[tokenizer] = found
    return found


@lru_cache(maxsize=128)
def _template(lltok, key: str):
    """A fresh matcher for (tokenizer, constraint), compiled once; sequences start from deep copies of it."""
    llg = _llguidance()
    grammar = _grammar_text(key)
    failed, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar, lltok)
    if failed:
        kind = json.loads(key)[0]
        raise ValueError(f"the grammar engine cannot compile this {kind} constraint: {'; '.join(messages)}")
    matcher = llg.LLMatcher(lltok, grammar, log_level=0)  # refused tokens are reported by advance()
    if matcher.is_error():
        raise ValueError(f"the grammar engine cannot compile this constraint: {matcher.get_error()}")
    return matcher


class GrammarState:
    """One sequence's matcher: which tokens may come next, advance, fork (beam search), rollback (speculation)."""

    def __init__(self, matcher, stop_ids: Sequence[int]) -> None:
        self.matcher, self.stop_ids = matcher, sorted(stop_ids)
        self.dead = False  # a token the grammar refused was forced in (beam search's losing candidates)

    @classmethod
    def start(cls, constraint: Constraint, tokenizer, stop_ids: Sequence[int] = ()) -> GrammarState:
        """A matcher at the start of the output; `stop_ids` end it (EOS and end-of-turn tokens by default)."""
        matcher = _template(engine_tokenizer(tokenizer), constraint.key()).deep_copy()
        return cls(matcher, stop_ids or sorted(tokenizer.stop_ids))

    @property
    def is_finished(self) -> bool:
        """The grammar accepts the output so far: a stop token may end it."""
        return not self.dead and self.matcher.is_accepting()

    def fill_bitmask(self, row: torch.Tensor) -> None:
        """Write the allowed-token bits into an int32 row of ceil(V / 32) words (bit t = token t allowed)."""
        if self.dead:
            row.zero_()
        else:
            self.matcher.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * row.element_size())

    def allowed_mask(self, vocab_size: int) -> torch.Tensor:
        """(vocab_size,) bool: the tokens that may come next (stop tokens only when the grammar accepts)."""
        words = torch.zeros(1, (vocab_size + 31) // 32, dtype=torch.int32)
        self.fill_bitmask(words[0])
        return finish_mask(unpack_bitmask(words, vocab_size), [self])[0]

    def advance(self, token: int) -> bool:
        """Consume one generated token; False (and the state turns dead) when the grammar refuses it."""
        if self.dead:
            return False
        if token in self.stop_ids:
            return self.matcher.is_accepting()
        if not self.matcher.consume_token(token):
            self.dead = True
        return not self.dead

    def rollback(self, num_tokens: int) -> None:
        """Forget the last num_tokens consumed tokens (speculative drafts the target rejected)."""
        if num_tokens and not self.matcher.rollback(num_tokens):
            raise RuntimeError(f"the grammar engine could not roll back {num_tokens} tokens")

    def fork(self) -> GrammarState:
        """An independent copy: a beam that branches off this one."""
        other = GrammarState(self.matcher.deep_copy(), self.stop_ids)
        other.dead = self.dead
        return other


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(B, W) int32 bit words -> (B, vocab_size) bool; tokens past 32 * W are refused."""
    shifts = torch.arange(32, dtype=torch.int32)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1  # (B, W, 32)
    allowed = bits.view(bitmask.shape[0], -1).bool()
    if allowed.shape[1] < vocab_size:
        allowed = torch.nn.functional.pad(allowed, (0, vocab_size - allowed.shape[1]))
    return allowed[:, :vocab_size]


def finish_mask(allowed: torch.Tensor, states: Sequence[GrammarState | None]) -> torch.Tensor:
    """Stop tokens allowed exactly where the grammar accepts; unconstrained rows (None) allow everything."""
    for row, state in enumerate(states):
        if state is None:
            allowed[row] = True
            continue
        stops = [t for t in state.stop_ids if t < allowed.shape[1]]
        allowed[row, stops] = state.is_finished
    return allowed


def apply_mask(logits: torch.Tensor, allowed: torch.Tensor, fill: float = float("-inf")) -> torch.Tensor:
    """The logits processor: disallowed tokens get `fill` (-inf; beam search passes a finite floor)."""
    return logits.masked_fill(~allowed.to(logits.device), fill)


_POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar-mask")  # llguidance drops the GIL


def masks_in_background(states: dict[int, GrammarState], vocab_size: int) -> Future:
    """Start filling {key: (V,) allowed mask} on the worker thread; the caller runs the model meanwhile and
    must not touch these states until the future is done (the serving engine keys them by sequence id)."""
    return _POOL.submit(lambda: {key: state.allowed_mask(vocab_size) for key, state in states.items()})


class ConstrainedBatch:
    """The grammar states of a batch's rows (None = unconstrained) and their next-step masks.

    `prefetch()` starts filling the masks on a worker thread (llguidance releases the GIL), so the caller
    can run the model's forward meanwhile; `masks()` waits for them (or fills them now)."""

    def __init__(self, states: list[GrammarState | None], vocab_size: int) -> None:
        self.states, self.vocab_size = states, vocab_size
        self.bitmask = torch.zeros(len(states), (vocab_size + 31) // 32, dtype=torch.int32)
        self.pending: Future | None = None

    @classmethod
    def start(cls, constraint: Constraint | None, tokenizer, rows: int, vocab_size: int) -> ConstrainedBatch | None:
        """Every row under the same constraint; None when there is no constraint."""
        if constraint is None:
            return None
        if tokenizer is None:
            raise ValueError("a constraint needs the tokenizer to build its token masks: pass tokenizer=")
        return cls([GrammarState.start(constraint, tokenizer) for _ in range(rows)], vocab_size)

    def _fill(self) -> torch.Tensor:
        for row, state in enumerate(self.states):
            if state is not None:
                state.fill_bitmask(self.bitmask[row])
        return finish_mask(unpack_bitmask(self.bitmask, self.vocab_size), self.states)

    def prefetch(self) -> None:
        """Start computing the next masks in the background (call right before the model's forward)."""
        self.pending = _POOL.submit(self._fill)

    def masks(self) -> torch.Tensor:
        """(B, V) bool allowed tokens for the next step."""
        pending, self.pending = self.pending, None
        return pending.result() if pending is not None else self._fill()

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits (B, V) with the tokens no row's grammar allows at -inf."""
        return apply_mask(logits, self.masks())

    def advance(self, tokens: Sequence[int | None]) -> None:
        """Feed each row its sampled token (None: the row is finished and keeps its state)."""
        for state, token in zip(self.states, tokens):
            if state is not None and token is not None and not state.advance(token):
                raise RuntimeError(f"the grammar refused token {token} that its own mask allowed")


def constraint_from_flags(json_schema: str | None = None, regex: str | None = None, choice: str | None = None,
                          grammar: str | None = None) -> Constraint | None:
    """The CLI's --json-schema FILE | --regex RE | --choice A,B,C | --grammar FILE as a Constraint (at most one)."""
    given = {k: v for k, v in dict(json_schema=json_schema, regex=regex, choice=choice, grammar=grammar).items()
             if v is not None}
    if len(given) > 1:
        raise ValueError(f"give at most one of --json-schema, --regex, --choice, --grammar; got {', '.join(given)}")
    if not given:
        return None
    (kind, value), = given.items()
    if kind in ("json_schema", "grammar"):
        try:
            with open(value, encoding="utf-8") as f:
                value = f.read()
        except OSError as e:
            raise ValueError(f"cannot read the --{kind.replace('_', '-')} file {value!r}: {e.strerror}") from None
    if kind == "choice":
        value = [c for c in value.split(",") if c]
    return Constraint(kind, value)
