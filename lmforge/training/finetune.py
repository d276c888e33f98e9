"""The fine-tuning recipe, top to bottom: setup, train loop, save adapters, export, cleanup.

Also the two CLI commands built on it: `lmforge finetune` and `lmforge data`.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import torch

from lmforge import hub
from lmforge.atomic import atomic_write_jsonl
from lmforge.training.adapters import save_adapter
from lmforge.training.continual import apply_continual
from lmforge.training.data import Batches, build_rows
from lmforge.training.bottleneck import apply_bottleneck
from lmforge.training.full import apply_full, save_full
from lmforge.training.lora import apply_lora, merge_and_unload
from lmforge.training.prefix import apply_prefix
from lmforge.training.objectives import sft_loss
from lmforge.training.recipe import Recipe, load_recipe, to_dict
from lmforge.training.trainer import train


def python_faq_dataset(out: str | Path, held_out: float = 0.1, seed: int = 0) -> tuple[Path, Path]:
    """Write the Python FAQ as Alpaca JSONL: out/train.jsonl and out/eval.jsonl (held-out split)."""
    from lmforge.data.python_faq import faq_pairs, split, to_alpaca

    out = Path(out)
    train_pairs, eval_pairs = split(faq_pairs(), held_out=held_out, seed=seed)
    atomic_write_jsonl(out / "train.jsonl", [to_alpaca(p) for p in train_pairs])
    atomic_write_jsonl(out / "eval.jsonl", [to_alpaca(p) for p in eval_pairs])
    return out / "train.jsonl", out / "eval.jsonl"


def default_data_dir() -> Path:
    return hub.cache_dir() / "data" / "python-faq"


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def setup(recipe: Recipe):
    """(model with adapter, tokenizer, train batches, eval batches) for a recipe."""
    from lmforge.checkpoint.load import load

    model, tokenizer = load(hub.resolve(recipe.model, pull_missing=recipe.model in hub.REGISTRY),
                            device=_device(recipe.device), dtype=torch.float32)  # adapters wrap float linears
    apply_adapter(model, recipe)
    rows, pad, evals = sft_rows(recipe, tokenizer)
    return model, tokenizer, Batches(rows, recipe.train.micro_batch, pad, seed=recipe.train.seed), evals


def sft_rows(recipe: Recipe, tokenizer):
    """(training rows, pad id, eval batches) of the recipe's SFT data (default: the Python FAQ set)."""
    d = recipe.data
    train_path, eval_path = d.train, d.eval
    if train_path is None:
        train_file, eval_file = python_faq_dataset(default_data_dir())
        train_path, eval_path = str(train_file), eval_path or str(eval_file)
    rows = build_rows(train_path, tokenizer, d.template, d.max_length, d.packing)
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    evals = None
    if eval_path:
        eval_rows = build_rows(eval_path, tokenizer, d.template, d.max_length, packing=False)
        evals = Batches(eval_rows, recipe.train.micro_batch, pad, shuffle=False).all()
    return rows, pad, evals


def apply_adapter(model, recipe: Recipe):
    """Make the recipe's `adapter` the trained part: LoRA/DoRA/QLoRA, a prefix, bottleneck adapters or every weight."""
    if recipe.adapter == "prefix":
        return apply_prefix(model, recipe.prefix)
    if recipe.adapter == "bottleneck":
        return apply_bottleneck(model, recipe.bottleneck)
    if recipe.adapter == "full":
        return apply_full(model)
    return apply_lora(model, recipe.lora)


def save_trained(model, tokenizer, path: Path, recipe: Recipe) -> Path:
    """The trained part: the whole model as a Hugging Face directory (full), else the adapter (PEFT layout)."""
    if recipe.adapter == "full":
        return save_full(model, tokenizer, path)
    return save_adapter(model, path, base_model=recipe.model)


# recipe.objective -> "module:function" running it (a function of (recipe, merge) -> summary dict)
RUNNERS: dict[str, str] = {"sft": "lmforge.training.finetune:run_sft"}
RUNNERS["dpo"] = "lmforge.training.dpo:run"
RUNNERS["pretrain"] = "lmforge.training.pretrain:run"
RUNNERS["distill"] = "lmforge.training.distill:run"
RUNNERS.update(reward="lmforge.training.reward:run", ppo="lmforge.training.ppo:run")


def run(recipe: Recipe, merge: bool = False) -> dict:
    """Run the recipe's objective (resuming when out_dir has checkpoints); return its summary."""
    target = RUNNERS.get(recipe.objective)
    if target is None:
        raise ValueError(f"objective={recipe.objective!r} is not known; objectives: {sorted(RUNNERS)}")
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)(recipe, merge)


def run_sft(recipe: Recipe, merge: bool = False) -> dict:
    """Train (resuming when out_dir has checkpoints), then write the adapters and optional merged model."""
    if merge and recipe.adapter != "lora":
        raise ValueError(f"--merge folds a LoRA adapter into the base; adapter={recipe.adapter!r} has nothing to "
                         "fold (full fine-tuning writes the whole model to out_dir/model already); drop --merge")
    out = Path(recipe.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.json").write_text(json.dumps(to_dict(recipe), indent=1))
    model, tokenizer, data, evals = setup(recipe)
    d = recipe.data  # continual: EWC, replay, task A's adapter (no-op when the section is off)
    data, objective = apply_continual(recipe.continual, model, tokenizer, data, sft_loss, d.template, d.max_length,
                                      d.packing, recipe.train.seed)
    summary = train(model, objective, data, recipe.train, out, eval_batches=evals)
    kind = "model" if recipe.adapter == "full" else "adapter"
    summary[kind] = str(save_trained(model, tokenizer, out / kind, recipe))
    for key in ("best", "averaged"):
        if summary.get(key):
            _write_variant(model, summary[key], lambda: save_trained(model, tokenizer, out / key, recipe))
            summary[f"{key}_{kind}"] = str(out / key)
    if merge:
        merged = merge_and_unload(model)
        from lmforge.checkpoint.hf import save_hf

        path = save_hf(merged, out / "merged")
        tokenizer.save_hf(path, model_max_length=merged.config.block_size)
        summary["merged"] = str(path)
    summary.pop("averaged", None)
    return summary


def _write_variant(model, source, save) -> None:
    """`save()` the trained tensors of another checkpoint (best) or averaged ones, restoring the last after."""
    from safetensors.torch import load_file

    tensors = source if isinstance(source, dict) else load_file(str(Path(source) / "trainable.safetensors"))
    params = dict(model.named_parameters())
    saved = {k: params[k].detach().clone() for k in tensors}
    with torch.no_grad():
        for k, v in tensors.items():
            params[k].copy_(v)
        save()
        for k, v in saved.items():
            params[k].copy_(v)


def finetune(overrides: list[str] | None = None, recipe: str = "lora", model: str | None = None,
             data: str | None = None, eval_data: str | None = None, out: str | None = None,
             merge: bool = False) -> int:
    """Fine-tune a model with LoRA, DoRA, QLoRA, prefix tuning, bottleneck adapters or all weights; run it
    again to resume after a stop.

    Args:
        overrides: dotted settings such as train.max_steps=50 lora.rank=16 data.packing=false.
        recipe: lora, dora, qlora, prefix, bottleneck, full (packaged YAML) or a path to a recipe YAML.
        model: a model name, a .gguf file or a Hugging Face directory (overrides the recipe).
        data: training JSONL (Alpaca or chat records); default: the Python FAQ set.
        eval_data: held-out JSONL evaluated every train.eval_every steps.
        out: output folder (checkpoints, metrics.jsonl, loss.png, adapter/ or model/ for full, best/); resumes
            when it has checkpoints.
        merge: also write the merged model as a Hugging Face directory (out/merged).
    """
    spec = load_recipe(recipe, overrides)
    spec.model = model or spec.model
    spec.out_dir = out or spec.out_dir
    spec.data.train = data or spec.data.train
    spec.data.eval = eval_data or spec.data.eval
    result = run(spec, merge=merge)
    for key in ("adapter", "best_adapter", "averaged_adapter", "model", "best_model",
                "merged", "plot", "best_eval_loss", "reward_model",
                "eval_accuracy", "first_reward", "last_reward", "max_kl"):
        if result.get(key) is not None:
            print(f"{key:>16}: {result[key]}")
    return 0


def data(name: str = "python-faq", out: str | None = None, held_out: float = 0.1, seed: int = 0) -> int:
    """Build a shipped instruction set as Alpaca JSONL (train.jsonl + eval.jsonl).

    Args:
        name: the data set; python-faq = the Python FAQ from Debian's python3.11-doc; python-faq-pairs = DPO
            pairs (FAQ answer chosen, SmolLM2-135M-Instruct's own answer rejected; generates ~360 answers);
            r-manuals = R manual sections (Debian r-doc-pdf), continual learning's task B.
        out: output folder (default: the lmforge cache, where `finetune` looks).
        held_out: fraction held out for evaluation.
        seed: seed of the split.
    """
    if name == "python-faq-pairs":  # preference pairs for DPO: FAQ answer chosen, the model's own rejected
        from lmforge.training.preference_data import build_command

        return build_command(out, held_out, seed)
    if name == "r-manuals":  # section title -> text records (data/r_manuals.py)
        from lmforge.data.r_manuals import r_manuals_dataset

        for f in r_manuals_dataset(out or hub.cache_dir() / "data" / "r-manuals", held_out, seed):
            print(f"{f}: {sum(1 for _ in open(f))} records")
        return 0
    if name != "python-faq":
        raise ValueError(f"unknown data set {name!r}; available: python-faq, python-faq-pairs, r-manuals")
    train_file, eval_file = python_faq_dataset(out or default_data_dir(), held_out, seed)
    for f in (train_file, eval_file):
        print(f"{f}: {sum(1 for _ in open(f))} records")
    return 0
