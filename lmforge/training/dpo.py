"""The preference-tuning recipe (DPO, IPO, SimPO), top to bottom: setup, reference, train loop, save.

`recipe.objective: dpo` with `adapter: lora`: the reference is the base model with the adapters turned
off (lora.disabled_adapters), no second copy; `adapter: full` trains every weight against a frozen copy.
With `dpo.precompute_ref` the reference log-probs of every pair are computed once before training.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from lmforge import hub
from lmforge.training.lora import merge_and_unload
from lmforge.training.objectives.dpo import PreferenceObjective
from lmforge.training.preferences import PreferenceBatches, build_pairs, precompute_reference
from lmforge.training.recipe import Recipe, to_dict
from lmforge.training.trainer import autocast_dtype, train


def setup(recipe: Recipe):
    """(model, tokenizer, frozen reference copy or None) for a recipe's model and adapter."""
    from lmforge.checkpoint.load import load
    from lmforge.training.finetune import _device, apply_adapter

    if recipe.adapter not in ("lora", "full"):
        raise ValueError(f"adapter={recipe.adapter!r}: preference tuning supports adapter lora (the reference is "
                         "the base with the adapter off) or full (a frozen copy is the reference)")
    model, tokenizer = load(hub.resolve(recipe.model, pull_missing=recipe.model in hub.REGISTRY),
                            device=_device(recipe.device), dtype=torch.float32)
    reference = None
    if recipe.adapter == "full" and recipe.dpo.uses_reference:
        reference = copy.deepcopy(model).eval().requires_grad_(False)
    apply_adapter(model, recipe)
    return model, tokenizer, reference


def data_paths(recipe: Recipe, model, tokenizer) -> tuple[str, str | None]:
    """(train, eval) JSONL paths: the recipe's, or the Python-FAQ pairs (built, with the model's own
    answers as the rejected ones, when missing; the model must still be the base here)."""
    d = recipe.data
    if d.train is not None:
        return d.train, d.eval
    from lmforge.training.preference_data import build_python_faq_pairs, default_pairs_dir

    train_file, eval_file = default_pairs_dir() / "train.jsonl", default_pairs_dir() / "eval.jsonl"
    if not (train_file.is_file() and eval_file.is_file()):
        train_file, eval_file = build_python_faq_pairs(model, tokenizer, default_pairs_dir(), recipe.model)
    return str(train_file), d.eval or str(eval_file)


def batches(recipe: Recipe, model, tokenizer, reference, path: str, shuffle: bool) -> PreferenceBatches:
    """Tokenized pairs of one file as batches, reference log-probs filled in when precomputing."""
    pairs = build_pairs(path, tokenizer, recipe.data.template, recipe.dpo)
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    mb = recipe.train.micro_batch
    if recipe.dpo.precompute_ref and recipe.dpo.uses_reference:
        device = next(model.parameters()).device
        precompute_reference(model, pairs, mb, pad, reference, autocast_dtype(recipe.train.precision, device),
                             progress=recipe.train.progress)
    return PreferenceBatches(pairs, mb, pad, seed=recipe.train.seed, shuffle=shuffle)


def run(recipe: Recipe, merge: bool = False) -> dict:
    """Train (resuming when out_dir has checkpoints), then write the adapter (or the full model)."""
    if merge and recipe.adapter != "lora":
        raise ValueError("--merge folds a LoRA adapter into the base; adapter=full writes out_dir/model; drop --merge")
    out = Path(recipe.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.json").write_text(json.dumps(to_dict(recipe), indent=1))
    model, tokenizer, reference = setup(recipe)
    train_path, eval_path = data_paths(recipe, model, tokenizer)
    data = batches(recipe, model, tokenizer, reference, train_path, shuffle=True)
    evals = batches(recipe, model, tokenizer, reference, eval_path, shuffle=False).all() if eval_path else None
    objective = PreferenceObjective(recipe.dpo, reference)
    summary = train(model, objective, data, recipe.train, out, eval_batches=evals)
    summary.pop("averaged", None)
    from lmforge.training.finetune import _write_variant, save_trained

    kind = "model" if recipe.adapter == "full" else "adapter"
    summary[kind] = str(save_trained(model, tokenizer, out / kind, recipe))
    if summary.get("best"):
        _write_variant(model, summary["best"], lambda: save_trained(model, tokenizer, out / "best", recipe))
        summary[f"best_{kind}"] = str(out / "best")
    if merge:
        from lmforge.checkpoint.hf import save_hf

        path = save_hf(merge_and_unload(model), out / "merged")
        tokenizer.save_hf(path, model_max_length=model.config.block_size)
        summary["merged"] = str(path)
    return summary
