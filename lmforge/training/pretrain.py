"""The pretraining recipe, top to bottom: setup (model, shards, mixture), train loop, save, cleanup.

From scratch (`pretrain.init: scratch`): a preset's architecture, randomly initialised, with the
tokenizer of `recipe.model`. Continued pretraining (`pretrain.init: smollm2-135m-instruct`): that
model's weights and tokenizer. Either way every parameter trains on the same data path: named sources
-> token shards (shards.py) -> a weighted, seeded, resumable mixture of packed rows (mixture.py) ->
the one training loop with `pretrain_loss`, held-out loss every eval_every steps, tokens/s and MFU
(mfu.py) in metrics.jsonl; the final model is saved as a Hugging Face directory (out/model).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from lmforge import hub
from lmforge.atomic import atomic_write_json, atomic_write_jsonl
from lmforge.training.mfu import mfu_hook
from lmforge.training.mixture import BUILTIN, Mixture, PretrainConfig, collate_tokens  # noqa: F401 (re-exported)
from lmforge.training.objectives import pretrain_loss
from lmforge.training.shards import Shard, build_shard, row, row_count
from lmforge.training.trainer import autocast_dtype, train

if TYPE_CHECKING:
    from lmforge.training.recipe import Recipe

R_MANUALS = ("R-intro", "R-lang", "R-data", "R-admin", "R-exts", "R-ints", "R-FAQ")  # not the 3,700-page refman


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def init_model(recipe: Recipe, device: torch.device):
    """(model with every parameter trainable, tokenizer): a fresh preset or a pulled checkpoint."""
    from lmforge.checkpoint.load import load
    from lmforge.config import Config
    from lmforge.model.transformer import build_model
    from lmforge.tokenizer import Tokenizer

    p = recipe.pretrain
    if recipe.adapter != "full":
        raise ValueError(f"adapter={recipe.adapter!r}: pretraining trains every parameter; set adapter: full")
    if p.init != "scratch":
        model, tokenizer = load(hub.resolve(p.init, pull_missing=p.init in hub.REGISTRY), device=device,
                                dtype=torch.float32)
        return model.requires_grad_(True), tokenizer
    tokenizer = Tokenizer.load(hub.resolve(recipe.model, pull_missing=recipe.model in hub.REGISTRY))
    config = Config.from_name(p.preset, **({"vocab_size": p.vocab_size} if p.vocab_size else {}))
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"the tokenizer of {recipe.model} has {tokenizer.vocab_size} ids but preset {p.preset} "
                         f"has vocab_size {config.vocab_size}; set pretrain.vocab_size >= {tokenizer.vocab_size}")
    if p.seq_len > config.block_size:
        raise ValueError(f"pretrain.seq_len={p.seq_len} exceeds {p.preset}'s block_size {config.block_size}")
    torch.manual_seed(recipe.train.seed)
    return build_model(config, device).requires_grad_(True), tokenizer


def corpus_paths(name: str, spec, shard_dir: Path) -> list[str]:
    """The text files of a source: a built-in corpus written once as JSONL under shard_dir/corpora, or paths."""
    if isinstance(spec, list):
        return [str(s) for s in spec]
    if spec not in BUILTIN:
        return [str(spec)]
    out = shard_dir / "corpora" / f"{spec}.jsonl"
    if spec == "r-manuals":
        return [str(_r_manuals(shard_dir / "corpora" / "r-manuals"))]
    if not out.is_file():
        atomic_write_jsonl(out, _builtin_records(spec))
    return [str(out)]


def _builtin_records(spec: str) -> list[dict]:
    if spec == "sotu":
        from lmforge.data.sotu import speeches

        return [{"text": s.text, "source": f"sotu/{s.year}/{s.president}"} for s in speeches()]
    from lmforge.data.python_docs import records

    return records()


def _r_manuals(out: Path) -> Path:
    """The R manuals (Debian r-doc-pdf) through `lmforge ingest`: out/pretrain.jsonl, built once."""
    if (out / "pretrain.jsonl").is_file():
        return out / "pretrain.jsonl"
    from lmforge.data.ingest import IngestConfig, ingest, load_tokenizer

    root = Path("/usr/share/R/doc/manual")
    pdfs = [str(root / f"{m}.pdf") for m in R_MANUALS if (root / f"{m}.pdf").is_file()]
    if not pdfs:
        raise ValueError(f"the R manuals are not in {root}; install them with `apt-get install r-doc-pdf`")
    ingest(pdfs, out, load_tokenizer("smollm2-135m-instruct"), IngestConfig(workers=1), progress=False)
    return out / "pretrain.jsonl"


def build_sources(p: PretrainConfig, tokenizer, shard_dir: Path) -> tuple[dict[str, Shard], dict[str, Shard]]:
    """(train shards, held-out shards) by source name; shards already built for the same files are reused."""
    train_shards, held = {}, {}
    for name, spec in p.sources.items():
        paths = corpus_paths(name, spec, shard_dir)
        train_shards[name] = build_shard(name, paths, tokenizer, shard_dir, "train", p.held_out)
        if p.held_out > 0:
            held[name] = build_shard(name, paths, tokenizer, shard_dir, "heldout", p.held_out)
    return train_shards, held


def held_out_batches(held: dict[str, Shard], p: PretrainConfig, micro_batch: int, eos: int, pad: int) -> list[dict]:
    """Up to eval_rows held-out rows, the same number from each source (fewer where a source has fewer)."""
    per_source = max(1, p.eval_rows // max(1, len(held)))
    rows = [row(s, i, p.seq_len) for s in held.values() for i in range(min(per_source, row_count(s, p.seq_len)))]
    return [collate_tokens(rows[i:i + micro_batch], eos, pad, p.document_mask) for i in range(0, len(rows), micro_batch)]


def setup(recipe: Recipe):
    """(model, tokenizer, train mixture, held-out batches) for a pretraining recipe."""
    p = recipe.pretrain
    model, tokenizer = init_model(recipe, _device(recipe.device))
    shard_dir = Path(p.shard_dir) if p.shard_dir else hub.cache_dir() / "shards"
    train_shards, held = build_sources(p, tokenizer, shard_dir)
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    data = Mixture(train_shards, p.weights, p.seq_len, recipe.train.micro_batch, tokenizer.eos_id, pad,
                   seed=recipe.train.seed, document_mask=p.document_mask)
    evals = held_out_batches(held, p, recipe.train.micro_batch, tokenizer.eos_id, pad) or None
    return model, tokenizer, data, evals


def run(recipe: Recipe, merge: bool = False) -> dict:
    """Pretrain (resuming when out_dir has checkpoints); save out/model as a Hugging Face directory."""
    from lmforge.checkpoint.hf import save_pretrained
    from lmforge.training.recipe import to_dict

    out = Path(recipe.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.json").write_text(json.dumps(to_dict(recipe), indent=1))
    model, tokenizer, data, evals = setup(recipe)
    device = next(model.parameters()).device
    amp = autocast_dtype(recipe.train.precision, device)
    hook = mfu_hook(model, recipe.pretrain.seq_len, device, amp or torch.float32)
    summary = train(model, pretrain_loss, data, recipe.train, out, eval_batches=evals, row_hook=hook)
    summary["model"] = str(save_pretrained(model, tokenizer, out / "model"))
    summary.update(parameters=sum(p.numel() for p in model.parameters()), flops_per_token=hook.flops_per_token,
                   peak_flops=hook.peak, dtype=str(amp or torch.float32), source_epochs=data.epochs(),
                   rows_drawn=data.draws, tokens_drawn=data.draws * recipe.pretrain.seq_len)
    atomic_write_json(out / "summary.json", summary)
    return summary


def pretrain(overrides: list[str] | None = None, recipe: str = "pretrain", init: str | None = None,
             out: str | None = None) -> int:
    """Pretrain a model from scratch, or continue pretraining a pulled one, on a weighted text mixture.

    Sources (State of the Union, the Python docs, the R manuals, or your .jsonl/.txt files) are
    tokenized once into memory-mapped shards; run it again to resume after a stop.

    Args:
        overrides: dotted settings such as train.max_steps=500 pretrain.seq_len=512 pretrain.weights.sotu=0.5.
        recipe: pretrain (packaged YAML) or a path to a recipe YAML.
        init: scratch, or a model name/path to continue pretraining (overrides pretrain.init).
        out: output folder (checkpoints, metrics.jsonl, loss.png, model/); resumes when it has checkpoints.
    """
    from lmforge.training.recipe import load_recipe

    spec = load_recipe(recipe, overrides)
    spec.pretrain.init = init or spec.pretrain.init
    spec.out_dir = out or spec.out_dir
    result = run(spec)
    for key in ("model", "plot", "final_eval_loss", "tokens_drawn"):
        if result.get(key) is not None:
            print(f"{key:>16}: {result[key]}")
    return 0
