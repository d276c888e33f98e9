"""The reward-model recipe, top to bottom: load the decoder, add LoRA and the scalar head, read preference
pairs, train with the Bradley-Terry loss through the shared loop, measure held-out pair accuracy, save.

A saved reward model is a folder: the LoRA adapter in PEFT's layout (adapter_config.json,
adapter_model.safetensors), the head (score.safetensors) and reward_config.json naming the base model and
fingerprinting its tokenizer, so PPO refuses a reward model whose token ids mean other text.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lmforge.atomic import atomic_write, atomic_write_json
from lmforge.training.objectives.reward import RewardConfig, RewardModel, RewardObjective, pair_accuracy  # noqa: F401

CONFIG_FILE = "reward_config.json"
HEAD_FILE = "score.safetensors"


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the tokenizer's (token, id) table: equal exactly when ids mean the same strings."""
    table = sorted(tokenizer.backend.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(table, ensure_ascii=False).encode()).hexdigest()


def save_reward_model(model: RewardModel, path: str | Path, base_model: str, tokenizer) -> Path:
    """Adapter (PEFT layout) + head (safetensors) + reward_config.json, each written atomically."""
    from lmforge.training.adapters import save_adapter

    path = Path(path)
    save_adapter(model.decoder, path, base_model=base_model)
    head = {"score.weight": model.score.weight.detach().contiguous().cpu()}
    atomic_write(path / HEAD_FILE, lambda tmp: save_file(head, str(tmp), metadata={"format": "pt"}))
    atomic_write_json(path / CONFIG_FILE, {
        "kind": "reward_model", "base_model": base_model, "head": HEAD_FILE,
        "vocab_size": model.config.vocab_size, "n_embd": model.config.n_embd,
        "tokenizer": {"vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id,
                      "sha256": tokenizer_fingerprint(tokenizer)}})
    return path


def read_reward_config(path: str | Path) -> dict:
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        raise ValueError(f"{file} not found; a reward model folder is what `lmforge finetune --recipe reward` "
                         f"writes to out_dir/reward_model")
    return json.loads(file.read_text())


def check_reward_model(path: str | Path, policy_name: str, policy, tokenizer) -> None:
    """Refuse a reward model trained for another vocabulary or tokenizer than the policy's (naming both)."""
    cfg = read_reward_config(path)
    theirs = (cfg["vocab_size"], cfg["tokenizer"]["sha256"])
    ours = (policy.config.vocab_size, tokenizer_fingerprint(tokenizer))
    if theirs != ours:
        raise ValueError(
            f"reward model {path} was trained for {cfg['base_model']} (vocabulary {theirs[0]}, tokenizer "
            f"{theirs[1][:12]}) but the policy is {policy_name} (vocabulary {ours[0]}, tokenizer {ours[1][:12]}): "
            f"the same ids are different text, so it cannot score the policy's responses; train a reward model "
            f"on {policy_name} (`lmforge finetune --recipe reward --model {policy_name}`)")


def load_reward_model(path: str | Path, device: torch.device | str = "cpu") -> RewardModel:
    """The frozen reward model of a folder (its base model from the lmforge cache, LoRA merged in)."""
    from lmforge import hub
    from lmforge.checkpoint.load import load
    from lmforge.training.adapters import load_adapter
    from lmforge.training.lora import merge_lora

    cfg = read_reward_config(path)
    decoder, _ = load(hub.resolve(cfg["base_model"]), device=device, dtype=torch.float32)
    load_adapter(decoder, path)
    merge_lora(decoder)
    model = RewardModel(decoder)
    head = load_file(str(Path(path) / cfg["head"]))
    if tuple(head["score.weight"].shape) != tuple(model.score.weight.shape):
        raise ValueError(f"{path}: score.weight has shape {tuple(head['score.weight'].shape)}, the base model "
                         f"{cfg['base_model']} needs {tuple(model.score.weight.shape)}")
    with torch.no_grad():
        model.score.weight.copy_(head["score.weight"])
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def reward_model_scorer(model: RewardModel, pad_id: int, chunk: int = 8):
    """A PPO reward function: the reward model's score of prompt + response, right-padded, `chunk` rows at once."""
    def score(prompts: list[list[int]], responses: list[list[int]]) -> torch.Tensor:
        device = model.score.weight.device
        out = []
        for start in range(0, len(prompts), chunk):
            rows = [p + r for p, r in zip(prompts[start:start + chunk], responses[start:start + chunk])]
            width = max(map(len, rows))
            ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            valid = torch.zeros((len(rows), width), dtype=torch.bool)
            for i, row in enumerate(rows):
                ids[i, :len(row)], valid[i, :len(row)] = torch.tensor(row), True
            batch = {"input_ids": ids, "positions": torch.arange(width).repeat(len(rows), 1), "valid": valid}
            with torch.no_grad():
                out.append(model({k: v.to(device) for k, v in batch.items()}).cpu())
        return torch.cat(out)

    return score


def run(recipe, merge: bool = False) -> dict:
    """`lmforge finetune --recipe reward`: train, report held-out pair accuracy, save out_dir/reward_model."""
    from lmforge import hub
    from lmforge.checkpoint.load import load
    from lmforge.training.finetune import _device
    from lmforge.training.lora import apply_lora
    from lmforge.training.preferences import PreferenceBatches, build_pairs
    from lmforge.training.recipe import to_dict
    from lmforge.training.trainer import train

    if merge:
        raise ValueError("--merge is not offered for a reward model; it is saved as adapter + head")
    out = Path(recipe.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.json").write_text(json.dumps(to_dict(recipe), indent=1))
    if recipe.adapter != "lora":
        raise ValueError(f"adapter={recipe.adapter!r}: the reward model trains LoRA on the decoder plus its head; "
                         "set adapter: lora")
    decoder, tokenizer = load(hub.resolve(recipe.model, pull_missing=recipe.model in hub.REGISTRY),
                              device=_device(recipe.device), dtype=torch.float32)
    cfg, d = recipe.reward, recipe.data
    train_path, eval_path = _pair_files(d.train, d.eval, decoder, tokenizer, recipe.model)
    apply_lora(decoder, recipe.lora)
    model = RewardModel(decoder)  # the head stays trainable (apply_lora froze only the decoder)
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    pairs = build_pairs(train_path, tokenizer, d.template, cfg)
    data = PreferenceBatches(pairs, recipe.train.micro_batch, pad, seed=recipe.train.seed)
    evals = None
    if eval_path:
        evals = PreferenceBatches(build_pairs(eval_path, tokenizer, d.template, cfg), recipe.train.micro_batch, pad,
                                  shuffle=False).all()
    objective = RewardObjective(cfg.center_rewards_coefficient)
    summary = train(model, objective, data, recipe.train, out, eval_batches=evals)  # rows get accuracy, eval_accuracy
    if evals:
        summary["eval_accuracy"] = pair_accuracy(model, evals)["accuracy"]
        summary["eval_pairs"] = sum(int(b["pairs"]) for b in evals)
    summary["reward_model"] = str(save_reward_model(model, out / "reward_model", recipe.model, tokenizer))
    return summary


def _pair_files(train_path: str | None, eval_path: str | None, decoder, tokenizer, name: str
                ) -> tuple[str, str | None]:
    """The recipe's preference files; without data.train, the Python FAQ pairs of `lmforge data python-faq-pairs`
    (built with the base model's own answers as the rejected ones when missing, as the dpo recipe does)."""
    if train_path is not None:
        return train_path, eval_path
    from lmforge.training.preference_data import build_python_faq_pairs, default_pairs_dir

    folder = default_pairs_dir()
    if not ((folder / "train.jsonl").is_file() and (folder / "eval.jsonl").is_file()):
        build_python_faq_pairs(decoder, tokenizer, folder, name)
    return str(folder / "train.jsonl"), eval_path or str(folder / "eval.jsonl")
