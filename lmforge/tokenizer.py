"""The tokenizer and chat template of a checkpoint: a GGUF file's metadata or a Hugging Face directory.

Both are turned into a `tokenizers` (Rust) tokenizer built the way Hugging Face transformers builds
it, so ids match `AutoTokenizer.from_pretrained(dir, gguf_file=...)`:

- GGUF "gpt2": byte-level BPE from the stored merges, split by the regex of `tokenizer.ggml.pre`.
- GGUF "llama" (SentencePiece): BPE with byte fallback whose merges are rebuilt from the vocabulary
  (every piece that splits into two pieces), ranked by score -- or, for Gemma, by file order.
- Control and user-defined tokens become added tokens, so ``<|im_start|>`` is matched whole.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend

from lmforge.chat_template import ChatTemplate, template_from_config
from lmforge.checkpoint.gguf_file import GGUFFile

# llama.cpp's token types (gguf.TokenType).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Tokens that end a turn, stopping generation alongside EOS when the vocabulary has them.
END_OF_TURN_TOKENS = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|endoftext|>", "<|end|>", "<|eom_id|>")

# Pre-tokenizer regexes of `tokenizer.ggml.pre` types (as in llama.cpp's llama-vocab.cpp); any
# other type, "smollm" and "default" included, gets GPT-2's split, as transformers gives it.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx", "falcon3"), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen"), _QWEN2_SPLIT),
}
# SentencePiece architectures whose scores do not follow the merge order; the file order does.
_RANK_BY_POSITION = frozenset({"gemma", "gemma2", "gemma3"})
SUPPORTED_MODELS = ("gpt2", "llama")

# -- GGUF metadata -------------------------------------------------------------------------------
def read_gguf_metadata(path: str | Path) -> dict[str, Any]:
    """All key/value metadata of a GGUF file, through the bounds-checked container reader.

    Arrays come back as lists (strings) or numpy; see `lmforge.checkpoint.gguf_file` for why not
    `gguf.GGUFReader` (seconds per 262k-entry vocabulary).
    """
    return GGUFFile(path).metadata


def _reader_metadata(reader: Any) -> dict[str, Any]:
    """The tokenizer metadata of an open `gguf.GGUFReader`."""
    wanted = (k for k in reader.fields if k.startswith("tokenizer.") or k == "general.architecture")
    return {key: reader.fields[key].contents() for key in wanted}


def _require(meta: Mapping[str, Any], key: str) -> Any:
    if key not in meta:
        raise ValueError(
            f"GGUF has no {key!r}: it carries no tokenizer lmforge can build "
            f"(supported tokenizer.ggml.model values: {', '.join(SUPPORTED_MODELS)})"
        )
    return meta[key]


# -- building the backend from GGUF metadata -----------------------------------------------------
def _byte_to_char() -> dict[int, str]:
    """GPT-2's byte-to-character table: printable Latin-1 bytes stand for themselves, the rest U+0100 on."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in table]
    table.update({b: chr(0x100 + n) for n, b in enumerate(others)})
    return table


def spm_merges(tokens: list[str], ranks: np.ndarray) -> list[tuple[str, str]]:
    """Merges implied by a SentencePiece vocabulary, in the order transformers' `generate_merges` gives.

    Every split of a piece into two pieces is a merge; higher-ranked merged pieces first, and on a
    tie the longer left part first. The comprehension visits each split once (1.2M for Gemma).
    """
    vocab = set(tokens)
    found = [
        (j, i, left, right)
        for j, token in enumerate(tokens)
        for i in range(len(token) - 1, 0, -1)
        if (left := token[:i]) in vocab and (right := token[i:]) in vocab
    ]
    if found and not np.all(np.diff(ranks) < 0):  # when ranks fall with position, found is in order
        owners, cuts = np.array([f[0] for f in found]), np.array([f[1] for f in found])
        order = np.lexsort((-cuts, -ranks[owners]))  # stable: rank desc, then left length desc
        found = [found[k] for k in order.tolist()]
    return [(left, right) for _, _, left, right in found]


def _spm_backend(meta: Mapping[str, Any], tokens: list[str]) -> Backend:
    """SentencePiece as BPE with byte fallback (transformers' LlamaTokenizer/GemmaTokenizer shape)."""
    gemma = meta.get("general.architecture") in _RANK_BY_POSITION
    if gemma:  # pieces of 2+ spaces are stored as spaces; the normalizer produces "▁" (transformers)
        tokens = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in tokens]
        # Gemma's scores are -position except control/user-defined pieces (-1000); rank by position.
        ranks = -np.arange(len(tokens), dtype=np.float64)
    else:
        ranks = np.asarray(_require(meta, "tokenizer.ggml.scores"), dtype=np.float64)
        if len(ranks) != len(tokens):
            raise ValueError(f"GGUF has {len(ranks)} tokenizer.ggml.scores for {len(tokens)} tokens")
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    vocab = dict(zip(tokens, range(len(tokens))))
    bpe = models.BPE(
        vocab, spm_merges(tokens, ranks), unk_token=None if unk_id is None else tokens[int(unk_id)],
        fuse_unk=True, byte_fallback=True,
    )  # fmt: skip
    backend = Backend(bpe)
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if gemma:
        backend.normalizer = normalizers.Replace(" ", "\u2581")
    else:
        prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
        scheme = "first" if prefix else "never"
        backend.pre_tokenizer = pre_tokenizers.Metaspace("\u2581", prepend_scheme=scheme, split=False)
        steps += [decoders.Strip(" ", 1, 0)] if prefix else []
    backend.decoder = decoders.Sequence(steps)
    return backend


def _byte_level_backend(meta: Mapping[str, Any], tokens: list[str]) -> Backend:
    """Byte-level BPE from the stored merges (transformers' GPT2Tokenizer shape)."""
    table = _byte_to_char()
    alphabet = set(table.values())
    spelled = [t if set(t) <= alphabet else "".join(table[b] for b in t.encode()) for t in tokens]
    merges = [tuple(m.split(" ", 1)) for m in _require(meta, "tokenizer.ggml.merges")]
    backend = Backend(models.BPE(dict(zip(spelled, range(len(spelled)))), merges, fuse_unk=False))
    split = PRE_TOKENIZER_SPLITS.get(meta.get("tokenizer.ggml.pre", "default"))
    if split is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(split), "isolated"), pre_tokenizers.ByteLevel(False, use_regex=False)]
        )
    backend.decoder = decoders.ByteLevel()
    return backend


def _add_gguf_special_tokens(backend: Backend, tokens: list[str], types: np.ndarray, byte_level: bool) -> None:
    """Control tokens become special added tokens, user-defined ones plain added tokens (matched whole).

    In a byte-level vocabulary a control token outside the byte alphabet is a llama.cpp mislabel
    and is skipped, as transformers does.
    """
    alphabet = set(_byte_to_char().values()) if byte_level else None
    control = [tokens[i] for i in np.flatnonzero(types == CONTROL).tolist()]
    user = [tokens[i] for i in np.flatnonzero(types == USER_DEFINED).tolist()]
    control = [t for t in control if alphabet is None or set(t) <= alphabet]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    user = [t for t in user if backend.token_to_id(t) is not None]  # Gemma's space pieces were respelled
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])


def _set_bos_eos(backend: Backend, bos: tuple[str, int] | None, eos: tuple[str, int] | None) -> None:
    """Make `encode(..., add_special_tokens=True)` add BOS and/or EOS, through a post-processor."""

    def sequence(piece: str, type_id: int) -> list[str]:
        parts = ([bos[0]] if bos else []) + [piece] + ([eos[0]] if eos else [])
        return [f"{part}:{type_id}" for part in parts]

    backend.post_processor = processors.TemplateProcessing(
        single=sequence("$A", 0),
        pair=sequence("$A", 0) + sequence("$B", 1),
        special_tokens=[s for s in (bos, eos) if s],
    )


def _build_gguf_backend(meta: Mapping[str, Any]) -> Backend:
    """The `tokenizers` tokenizer a GGUF's metadata describes."""
    model = _require(meta, "tokenizer.ggml.model")
    tokens = list(_require(meta, "tokenizer.ggml.tokens"))
    types = np.asarray(meta.get("tokenizer.ggml.token_type", np.full(len(tokens), NORMAL)))
    if len(types) != len(tokens):
        raise ValueError(f"GGUF has {len(types)} tokenizer.ggml.token_type entries for {len(tokens)} tokens")
    if model == "gpt2":
        backend = _byte_level_backend(meta, tokens)
    elif model == "llama":
        backend = _spm_backend(meta, tokens)
    else:
        raise ValueError(
            f"GGUF tokenizer.ggml.model is {model!r}; lmforge supports {', '.join(SUPPORTED_MODELS)} "
            "(byte-level BPE and SentencePiece)"
        )
    _add_gguf_special_tokens(backend, tokens, types, byte_level=model == "gpt2")
    return backend


def _special_id(meta: Mapping[str, Any], key: str, vocab_size: int) -> int | None:
    """A special token id from the metadata, checked against the vocabulary."""
    value = meta.get(key)
    if value is None:
        return None
    if not 0 <= int(value) < vocab_size:
        raise ValueError(f"GGUF {key!r} is {value}, outside the vocabulary of {vocab_size} tokens")
    return int(value)


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object from an optional file ({} when it is absent)."""
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _token_text(entry: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    return entry.get("content") if isinstance(entry, dict) else entry


class Tokenizer:
    """Text <-> token ids, plus the checkpoint's chat template; a thin layer over a `tokenizers` tokenizer."""

    def __init__(
        self,
        backend: Backend,
        chat_template: ChatTemplate,
        bos_id: int | None = None,
        eos_id: int | None = None,
        pad_id: int | None = None,
    ):
        self.backend = backend
        self.chat_template = chat_template
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        turn_ends = {backend.token_to_id(t) for t in END_OF_TURN_TOKENS} | {eos_id}
        self.stop_ids: set[int] = {i for i in turn_ends if i is not None}

    # -- loading --------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """The tokenizer of a checkpoint: a .gguf file or a Hugging Face directory."""
        path = Path(path)
        if path.is_dir():
            return cls.from_hf_dir(path)
        if path.is_file():
            with open(path, "rb") as f:
                if f.read(4) == b"GGUF":
                    return cls.from_gguf(path)
        raise ValueError(f"{path} is neither a GGUF file nor a directory holding tokenizer.json")

    @classmethod
    def from_gguf(cls, path_or_reader: str | Path | Any) -> Tokenizer:
        """The tokenizer stored in a GGUF file's metadata: a path, an open `GGUFFile` or `gguf.GGUFReader`."""
        if isinstance(path_or_reader, GGUFFile):
            return cls.from_gguf_metadata(path_or_reader.metadata)
        if hasattr(path_or_reader, "fields"):
            return cls.from_gguf_metadata(_reader_metadata(path_or_reader))
        return cls.from_gguf_metadata(read_gguf_metadata(path_or_reader))

    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any]) -> Tokenizer:
        """The tokenizer from GGUF metadata (as `read_gguf_metadata` returns), for a caller that has read it."""
        backend = _build_gguf_backend(meta)
        size = len(meta["tokenizer.ggml.tokens"])
        keys = (f"tokenizer.ggml.{k}_token_id" for k in ("bos", "eos", "padding"))
        bos, eos, pad = (_special_id(meta, key, size) for key in keys)
        # Older SentencePiece files have no flag; llama.cpp and transformers then add BOS.
        add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", meta["tokenizer.ggml.model"] == "llama"))
        add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
        bos_token = (backend.id_to_token(bos), bos) if add_bos and bos is not None else None
        eos_token = (backend.id_to_token(eos), eos) if add_eos and eos is not None else None
        if bos_token or eos_token:
            _set_bos_eos(backend, bos_token, eos_token)
        template = ChatTemplate.or_fallback(meta.get("tokenizer.chat_template"), backend.token_to_id)
        return cls(backend, template, bos, eos, pad)

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> Tokenizer:
        """The tokenizer of a Hugging Face directory: tokenizer.json, tokenizer_config.json and friends."""
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise ValueError(f"{path} has no tokenizer.json; lmforge reads fast (tokenizers) checkpoints only")
        backend = Backend.from_file(str(path / "tokenizer.json"))
        config = _read_json(path / "tokenizer_config.json")
        special_map = _read_json(path / "special_tokens_map.json")
        names = ("bos_token", "eos_token", "pad_token")
        texts = {k: _token_text(config.get(k) or special_map.get(k)) for k in names}
        bos, eos, pad = (backend.token_to_id(t) if t else None for t in texts.values())
        if config.get("add_bos_token") and bos is not None and bos not in backend.encode("").ids:
            _set_bos_eos(backend, (texts["bos_token"], bos), None)
        jinja_file = path / "chat_template.jinja"
        source = jinja_file.read_text("utf-8") if jinja_file.is_file() else template_from_config(config)
        return cls(backend, ChatTemplate.or_fallback(source, backend.token_to_id), bos, eos, pad)

    def save_hf(self, path: str | Path, model_max_length: int | None = None) -> None:
        """Write tokenizer.json + tokenizer_config.json (with the chat template), as transformers and vLLM read them."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(path / "tokenizer.json"))
        name = self.backend.id_to_token
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": name(self.bos_id) if self.bos_id is not None else None,
            "eos_token": name(self.eos_id) if self.eos_id is not None else None,
            "pad_token": name(self.pad_id) if self.pad_id is not None else None,
            "chat_template": self.chat_template.source,
            "clean_up_tokenization_spaces": False,
        }
        if model_max_length:
            config["model_max_length"] = model_max_length
        (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))

    # -- text <-> ids ---------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; with `add_special_tokens`, BOS/EOS as the checkpoint asks (add_bos_token)."""
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}")
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        """`encode` over many texts at once (in parallel, in Rust)."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("encode_batch takes a list of str")
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        """The text of token ids; bytes that do not form UTF-8 come out as U+FFFD."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def stream_decoder(self, skip_special_tokens: bool = True) -> StreamDecoder:
        """A decoder for tokens arriving one at a time, as generation produces them."""
        return StreamDecoder(self, skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(int(token_id))

    # -- chat -----------------------------------------------------------------------------------
    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True, **extra: Any
    ) -> str:
        """The prompt text of a conversation, rendered by the checkpoint's template in a sandbox.

        The text already holds any BOS the template writes (Gemma's does): encode it with
        `add_special_tokens=False`, as transformers does, or BOS appears twice.
        """
        specials = {"bos_token": self._text(self.bos_id), "eos_token": self._text(self.eos_id)}
        specials["pad_token"] = self._text(self.pad_id)
        return self.chat_template.render(messages, add_generation_prompt, **{**specials, **extra})

    def _text(self, token_id: int | None) -> str:
        return "" if token_id is None else self.backend.id_to_token(token_id) or ""


class StreamDecoder:
    """Turns token ids into text deltas, holding back a UTF-8 character until its last byte arrives.

    It decodes a short window (the last emitted tokens plus the pending ones) and emits what the new
    tokens added, so decoders that look at neighbours (SentencePiece's leading-space strip, byte
    fallback) behave as in a full `decode`.
    """

    _MAX_PENDING = 8  # tokens held back at most; a longer incomplete run is invalid UTF-8, emitted as is

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self._tokenizer, self._skip = tokenizer, skip_special_tokens
        self._ids: list[int] = []
        self._prefix = self._read = 0  # window start; end of the tokens already emitted

    def _decode(self, start: int, end: int | None = None) -> str:
        return self._tokenizer.decode(self._ids[start:end], skip_special_tokens=self._skip)

    def add(self, token_id: int) -> str:
        """The text `token_id` completes ("" while a character or byte-fallback sequence is incomplete)."""
        self._ids.append(int(token_id))
        done, text = self._decode(self._prefix, self._read), self._decode(self._prefix)
        pending = len(self._ids) - self._read
        if len(text) <= len(done) or (text.endswith("\ufffd") and pending < self._MAX_PENDING):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(done) :]

    def flush(self) -> str:
        """The text still held back (an incomplete character comes out as U+FFFD)."""
        done, text = self._decode(self._prefix, self._read), self._decode(self._prefix)
        self._prefix = self._read = len(self._ids)
        return text[len(done) :]
