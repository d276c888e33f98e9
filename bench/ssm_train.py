"""bench_ssm's training part: a transformer and a Mamba model of equal parameters, trained from scratch on
the same bytes for the same steps through lmforge's training loop, then scored on held-out text.

Text: the State of the Union speeches before 2000 (training) and from 2000 on (held out), and the
Python 3.11 tutorial and HOWTO pages from Debian's python3.11-doc (every HOLD_OUT_EVERY-th page held
out, the rest trained on). Tokens are UTF-8 bytes (vocabulary 256), so no tokenizer favours either
model and losses are nats per byte. Training windows alternate between the two corpora; held-out
windows are the first non-overlapping windows of each held-out text, which training never sees.
"""

from __future__ import annotations

import json
import random
import re
import tempfile
import time
from html.parser import HTMLParser
from pathlib import Path

import torch

from lmforge.config import Config
from lmforge.model.transformer import build_model

DOC_ROOTS = (Path("/usr/share/doc/python3.11/html"), Path("/usr/share/doc/python3/html"))
DOC_FOLDERS = ("tutorial", "howto")
HOLD_OUT_EVERY = 5  # page i (sorted by path) is held out when i % 5 == 0


class _Text(HTMLParser):
    """The text of a Sphinx page's main body (navigation, scripts and styles left out)."""

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self.depth = 0  # > 0 inside <div role="main">
        self.skip = 0  # > 0 inside <script> / <style>

    def handle_starttag(self, tag: str, attrs) -> None:
        if tag == "div" and (self.depth or dict(attrs).get("role") == "main"):
            self.depth += 1
        self.skip += tag in ("script", "style")

    def handle_endtag(self, tag: str) -> None:
        if tag == "div" and self.depth:
            self.depth -= 1
        self.skip -= tag in ("script", "style") and self.skip > 0

    def handle_data(self, data: str) -> None:
        if self.depth and not self.skip:
            self.parts.append(data)


def page_text(path: Path) -> str:
    parser = _Text()
    parser.feed(path.read_text(encoding="utf-8", errors="replace"))
    return re.sub(r"\n\s*\n+", "\n\n", "".join(parser.parts)).strip()


def python_docs() -> tuple[str, str] | None:
    """(training text, held-out text) of the Python tutorial and HOWTOs, or None without the package."""
    root = next((r for r in DOC_ROOTS if r.is_dir()), None)
    if root is None:
        return None
    pages = sorted(p for folder in DOC_FOLDERS for p in (root / folder).glob("*.html") if p.name != "index.html")
    texts = [page_text(p) for p in pages]
    held = "\n\n".join(t for i, t in enumerate(texts) if i % HOLD_OUT_EVERY == 0)
    return "\n\n".join(t for i, t in enumerate(texts) if i % HOLD_OUT_EVERY), held


def corpora() -> dict[str, tuple[bytes, bytes]]:
    """{name: (training bytes, held-out bytes)}: State of the Union, plus the Python docs when installed."""
    from lmforge.data import sotu

    out = {"sotu": (sotu.calibration_text().encode(), sotu.held_out_text().encode())}
    docs = python_docs()
    if docs is None:
        print("python3.11-doc is not installed: training on State of the Union only")
    else:
        out["python-docs"] = (docs[0].encode(), docs[1].encode())
    return out


def param_count(config: Config) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in build_model(config, device="meta").parameters())


def model_pair(d_model: int, layers: int, block_size: int) -> tuple[Config, Config]:
    """A LLaMA-style transformer and the Mamba model of the same width whose depth gives the nearest
    parameter count (bytes as tokens: vocabulary 256)."""
    transformer = Config(name="bench-transformer", vocab_size=256, n_layer=layers, n_embd=d_model,
                         n_head=max(1, d_model // 64), intermediate_size=(8 * d_model // 3 + 15) // 16 * 16,
                         block_size=block_size)  # SwiGLU width ~ 8/3 d (LLaMA)
    target = param_count(transformer)
    mambas = [Config(name="bench-mamba", arch="mamba", vocab_size=256, n_layer=n, n_embd=d_model)
              for n in range(1, 4 * layers + 1)]
    return transformer, min(mambas, key=lambda c: abs(param_count(c) - target))


def windows(data: bytes, length: int, count: int, rng: random.Random | None) -> list[list[int]]:
    """`count` windows of `length` + 1 bytes: random starts with `rng`, else the first non-overlapping ones."""
    if len(data) < (length + 1) * (1 if rng else count):
        raise ValueError(f"a text of {len(data)} bytes is too short for {count} windows of {length + 1}")
    if rng is None:
        return [list(data[i * length:i * length + length + 1]) for i in range(count)]
    return [list(data[s:s + length + 1]) for s in (rng.randrange(len(data) - length - 1) for _ in range(count))]


def train_one(config: Config, texts: dict, args, out_dir: Path) -> dict:
    """Train one model from scratch with lmforge's loop; its curve, held-out losses and timings."""
    from lmforge.training.data import Batches, Example
    from lmforge.training.objectives import pretrain_loss
    from lmforge.training.trainer import TrainConfig, evaluate, train

    torch.manual_seed(args.seed)
    model = build_model(config)
    rng, names = random.Random(args.seed), list(texts)
    rows = [[Example(w, w)] for i in range(args.train_steps * args.micro_batch)
            for w in windows(texts[names[i % len(names)]][0], args.seq_len, 1, rng)]
    held = {name: Batches([[Example(w, w)] for w in windows(texts[name][1], args.seq_len, args.eval_windows, None)],
                          args.micro_batch, pad_id=0, shuffle=False).all() for name in names}
    cfg = TrainConfig(max_steps=args.train_steps, micro_batch=args.micro_batch, lr=args.lr,
                      warmup_steps=max(1, args.train_steps // 10), eval_every=max(1, args.train_steps // 4),
                      save_every=0, precision="fp32", gradient_checkpointing=False, seed=args.seed, progress=False)
    start = time.perf_counter()
    train(model, pretrain_loss, Batches(rows, args.micro_batch, pad_id=0, seed=args.seed), cfg, out_dir,
          eval_batches=[b for batches in held.values() for b in batches])
    seconds = time.perf_counter() - start
    metrics = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {"params": param_count(config), "n_layer": config.n_layer, "train_s": seconds,
            "tokens": args.train_steps * args.micro_batch * args.seq_len,
            "held_out": {name: evaluate(model, pretrain_loss, batches) for name, batches in held.items()},
            "curve": [{k: m[k] for k in ("step", "loss", "eval_loss", "tokens_per_s") if k in m} for m in metrics]}


def run_training(args) -> dict:
    """Both models on the same rows and held-out windows; {'transformer': ..., 'mamba': ...}."""
    texts = corpora()
    transformer, mamba = model_pair(args.d_model, args.layers, block_size=args.seq_len + 1)
    out = {"corpora": {name: {"train_bytes": len(t), "held_out_bytes": len(h)} for name, (t, h) in texts.items()}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, config in (("transformer", transformer), ("mamba", mamba)):
            print(f"training {name} ({param_count(config) / 1e6:.2f}M parameters, {config.n_layer} layers)",
                  flush=True)
            out[name] = train_one(config, texts, args, Path(tmp) / name)
    return out
