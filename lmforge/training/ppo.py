"""RLHF with PPO, top to bottom: roll out, score, shape with the KL penalty, estimate advantages, update,
adapt beta, checkpoint (Ziegler et al. 2019, https://arxiv.org/abs/1909.08593; Ouyang et al. 2022,
https://arxiv.org/abs/2203.02155, section 3.5; PPO: Schulman et al. 2017). The math is objectives/ppo.py.

Each iteration: (1) sample `rollout_batch` prompts and their responses at temperature 1 with lmforge's own
generation; (2) one no-grad forward gives the sampling policy's log-probs and values, one more with the LoRA
adapters off gives the reference log-probs, the reward function scores each response; (3) per-token rewards
-beta KL_t plus the score on the last token, GAE advantages (whitened) and returns; (4) `ppo_epochs` passes
of shuffled minibatches of the clipped policy loss + vf_coef * clipped value loss; (5) beta moves toward
the KL target. The value head is a linear layer on the policy's final hidden states (as trl's). Dropout stays
off (eval mode) so the policy that is updated is the function that sampled.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from lmforge.generation.generate import generate_ids
from lmforge.generation.sampling import SamplingParams
from lmforge.training.checkpoints import latest_checkpoint, restore_trained, rng_tensors, save_checkpoint
from lmforge.training.lora import disabled_adapters
from lmforge.training.objectives.forward import hidden_states
from lmforge.training.objectives.ppo import (AdaptiveKLController, PPOConfig, entropy_from_logits, gae, masked_mean,
                                             masked_whiten, policy_loss, shaped_rewards, value_loss)
from lmforge.training.optim import build_optimizer, load_optimizer_tensors, optimizer_tensors
from lmforge.training.schedules import lr_at
from lmforge.training.trainer import MetricsLog, TrainConfig

RewardFn = Callable[[list[list[int]], list[list[int]]], torch.Tensor]  # (prompts, responses) -> scores (B,)




def token_fraction_reward(token_id: int) -> RewardFn:
    """Scripted reward: the share of response tokens equal to `token_id` (a test signal)."""
    return lambda prompts, responses: torch.tensor([sum(t == token_id for t in r) / max(1, len(r)) for r in responses])


def length_reward(target: int) -> RewardFn:
    """Scripted reward: -|len(response) - target| / target, highest for a response of `target` tokens."""
    return lambda prompts, responses: torch.tensor([-abs(len(r) - target) / target for r in responses])


@dataclass
class Rollout:
    """One iteration's episodes, padded to (B, T) sequences and (B, R) response tokens."""

    batch: dict  # input_ids, positions, valid of prompt + response (right padding)
    index: torch.Tensor  # (B, R) position of the hidden state that predicts each response token
    targets: torch.Tensor  # (B, R) response token ids (0 on padding)
    mask: torch.Tensor  # (B, R) True on response tokens
    logprobs: torch.Tensor
    values: torch.Tensor
    ref_logprobs: torch.Tensor
    scores: torch.Tensor  # (B,)


def pad_episodes(prompts: list[list[int]], responses: list[list[int]], pad_id: int, device) -> tuple:
    """(batch, index, targets, mask): prompt + response rows, right-padded."""
    rows = [p + r for p, r in zip(prompts, responses)]
    B, T, R = len(rows), max(map(len, rows)), max(map(len, responses))
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    valid = torch.zeros((B, T), dtype=torch.bool)
    index = torch.zeros((B, R), dtype=torch.long)
    targets = torch.zeros((B, R), dtype=torch.long)
    mask = torch.zeros((B, R), dtype=torch.bool)
    for b, (p, r) in enumerate(zip(prompts, responses)):
        ids[b, :len(p) + len(r)] = torch.tensor(p + r)
        valid[b, :len(p) + len(r)] = True
        index[b, :len(r)] = torch.arange(len(p) - 1, len(p) + len(r) - 1)  # hidden at t predicts token t + 1
        targets[b, :len(r)] = torch.tensor(r)
        mask[b, :len(r)] = True
    batch = {"input_ids": ids, "positions": torch.arange(T).repeat(B, 1), "valid": valid}
    return {k: v.to(device) for k, v in batch.items()}, index.to(device), targets.to(device), mask.to(device)


def policy_forward(model, value_head: nn.Module | None, batch: dict, index: torch.Tensor, targets: torch.Tensor,
                   entropy: bool = False) -> dict[str, torch.Tensor]:
    """Log-probs of the response tokens (B, R), and values / entropies there when asked."""
    hidden = hidden_states(model, batch)  # (B, T, n_embd)
    h = hidden.gather(1, index[..., None].expand(-1, -1, hidden.shape[-1]))  # (B, R, n_embd)
    logits = model.logits(h).float()  # (B, R, vocab)
    logp = torch.log_softmax(logits, dim=-1)
    out = {"logprobs": logp.gather(-1, targets[..., None]).squeeze(-1)}
    if value_head is not None:
        out["values"] = value_head(h.to(value_head.weight.dtype)).squeeze(-1).float()
    if entropy:
        out["entropy"] = entropy_from_logits(logits.detach())
    return out


@torch.no_grad()
def collect(model, value_head, prompts: list[list[int]], reward_fn: RewardFn, cfg: PPOConfig, eos_id: int,
            pad_id: int, seed: int) -> Rollout:
    """Sample responses (temperature 1, EOS kept when sampled) and everything the update needs."""
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=1.0, seed=seed)
    responses = generate_ids(model, prompts, params, eos_ids={eos_id})
    limit = min(cfg.max_new_tokens, model.config.block_size - max(map(len, prompts)))
    responses = [r + [eos_id] if len(r) < limit else r for r in responses]  # stopped at EOS: the EOS is an action
    device = next(model.parameters()).device
    batch, index, targets, mask = pad_episodes(prompts, responses, pad_id, device)
    current = policy_forward(model, value_head, batch, index, targets)
    with disabled_adapters(model):
        ref = policy_forward(model, None, batch, index, targets)
    scores = reward_fn(prompts, responses).float().to(device)
    return Rollout(batch, index, targets, mask, current["logprobs"] * mask, current["values"] * mask,
                   ref["logprobs"] * mask, scores)


def update(model, value_head, rollout: Rollout, opt, params: dict, cfg: PPOConfig, max_grad_norm: float,
           beta: float, generator: torch.Generator) -> dict[str, float]:
    """Advantages from the KL-shaped rewards, then ppo_epochs x minibatches of clipped updates."""
    r = rollout
    rewards, kl = shaped_rewards(r.scores, r.logprobs, r.ref_logprobs, r.mask, beta)
    advantages, returns = gae(rewards, r.values, r.mask, cfg.gamma, cfg.lam)
    advantages = masked_whiten(advantages, r.mask)
    sums: dict[str, float] = {}
    n = 0
    B = r.mask.shape[0]
    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(B, generator=generator)
        for start in range(0, B, cfg.mini_batch):
            rows = order[start:start + cfg.mini_batch].to(r.mask.device)
            mb = {k: v[rows] for k, v in r.batch.items()}
            out = policy_forward(model, value_head, mb, r.index[rows], r.targets[rows], entropy=True)
            mask = r.mask[rows]
            pg, pg_stats = policy_loss(out["logprobs"], r.logprobs[rows], advantages[rows], mask, cfg.clip_range)
            vf, vf_clip = value_loss(out["values"], r.values[rows], returns[rows], mask, cfg.clip_range_value)
            loss = pg + cfg.vf_coef * vf
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(list(params.values()), max_grad_norm) if max_grad_norm else 0.0
            opt.step()
            opt.zero_grad(set_to_none=True)
            step = {"policy_loss": pg, "value_loss": vf, "value_clip_frac": vf_clip, "grad_norm": norm,
                    "entropy": masked_mean(out["entropy"], mask), **pg_stats}
            for k, v in step.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach() if isinstance(v, torch.Tensor) else v)
            n += 1
    seq_kl = kl.sum(dim=1)  # (B,) per-response KL estimate
    return {**{k: v / n for k, v in sums.items()}, "kl": float(seq_kl.mean()),
            "non_score_reward": float((-beta * kl).sum(dim=1).mean()),
            "return_mean": float(masked_mean(returns, r.mask))}


def pick_prompts(prompts: list[list[int]], n: int, seed: int, step: int) -> list[list[int]]:
    """The prompts of iteration `step`: a fixed function of (seed, step), so a resumed run repeats them."""
    rng = random.Random(seed * 1_000_003 + step)
    return [prompts[i] for i in (rng.sample(range(len(prompts)), n) if n <= len(prompts)
                                 else [rng.randrange(len(prompts)) for _ in range(n)])]


def run_ppo(model, prompts: list[list[int]], reward_fn: RewardFn, cfg: PPOConfig, train: TrainConfig,
            out_dir: str | Path, eos_id: int, pad_id: int, base_model: str | None = None) -> dict:
    """PPO on a LoRA-wrapped `model` (resuming from out_dir/checkpoints); returns a summary."""
    if not any("lora_" in n for n, _ in model.named_parameters()):
        raise ValueError("PPO's reference is the model with its LoRA adapters off; apply_lora(model, ...) first")
    if not prompts:
        raise ValueError("PPO needs at least one prompt")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(train.seed)
    device = next(model.parameters()).device
    value_head = nn.Linear(model.config.n_embd, 1, device=device)
    nn.init.zeros_(value_head.weight)  # values start at 0 (bias learns the mean return)
    nn.init.zeros_(value_head.bias)
    model.gradient_checkpointing = train.gradient_checkpointing
    model.eval()  # no dropout: the updated policy is the one that sampled
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    params.update({f"value_head.{n}": p for n, p in value_head.named_parameters()})
    opt = build_optimizer(params, train.optimizer, train.lr, train.weight_decay)
    kl_ctl = AdaptiveKLController(cfg.init_kl_coef, cfg.kl_target, cfg.kl_horizon)
    start = _resume(out_dir / "checkpoints", params, opt, kl_ctl)
    metrics = MetricsLog(out_dir / "metrics.jsonl", start)
    (out_dir / "ppo_config.json").write_text(json.dumps({"ppo": asdict(cfg), "train": asdict(train)}, indent=1))
    bar = _progress(train, start)
    try:
        for step in range(start, train.max_steps):
            row = _iteration(model, value_head, prompts, reward_fn, cfg, train, opt, params, kl_ctl, step, eos_id,
                             pad_id)
            metrics.write(row)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(reward=f"{row['reward']:.3f}", kl=f"{row['kl']:.2f}", beta=f"{row['kl_coef']:.3f}")
            if (train.save_every and (step + 1) % train.save_every == 0) or step + 1 == train.max_steps:
                save_checkpoint(out_dir / "checkpoints", step + 1, params, {**optimizer_tensors(opt, list(params)),
                                **rng_tensors()}, {"kl_coef": kl_ctl.value}, None, keep=train.keep_last)
    finally:
        metrics.close()
        if bar is not None:
            bar.close()
    return _finish(model, value_head, out_dir, base_model)


def _iteration(model, value_head, prompts, reward_fn, cfg: PPOConfig, train: TrainConfig, opt, params, kl_ctl,
               step: int, eos_id: int, pad_id: int) -> dict:
    """One PPO iteration: rollout, update, beta update; returns its metrics row."""
    t0 = time.perf_counter()
    lr = lr_at(step, train.lr, train.warmup_steps, train.max_steps, train.decay, train.min_lr_ratio)
    for group in opt.param_groups:
        group["lr"] = lr
    seed = train.seed * 1_000_003 + step
    rollout = collect(model, value_head, pick_prompts(prompts, cfg.rollout_batch, train.seed, step), reward_fn, cfg,
                      eos_id, pad_id, seed)
    beta = kl_ctl.value
    stats = update(model, value_head, rollout, opt, params, cfg, train.max_grad_norm, beta,
                   torch.Generator().manual_seed(seed))
    kl_ctl.update(stats["kl"], cfg.rollout_batch)
    lengths = rollout.mask.sum(dim=1).float()
    return {"step": step + 1, "reward": float(rollout.scores.mean()), "reward_std": float(rollout.scores.std()),
            **stats, "kl_coef": beta, "kl_target": cfg.kl_target, "response_length": float(lengths.mean()),
            "lr": lr, "seconds": time.perf_counter() - t0}


def _resume(root: Path, params: dict, opt, kl_ctl: AdaptiveKLController) -> int:
    """Restore the last checkpoint (LoRA + value head, optimizer, RNG, beta); return its step."""
    ckpt = latest_checkpoint(root)
    if ckpt is None:
        return 0
    load_optimizer_tensors(opt, list(params), restore_trained(ckpt, params))
    kl_ctl.value = float(ckpt.state["kl_coef"])
    return int(ckpt.state["step"])


def _progress(train: TrainConfig, start: int):
    if not train.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=train.max_steps, initial=start, desc="ppo", unit="iter", dynamic_ncols=True)


def _finish(model, value_head: nn.Module, out_dir: Path, base_model: str | None) -> dict:
    """Adapter (PEFT layout), value head (safetensors) and the PPO plot."""
    from safetensors.torch import save_file

    from lmforge.atomic import atomic_write
    from lmforge.training.adapters import save_adapter
    from lmforge.training.plot import plot_ppo, read_metrics

    adapter = save_adapter(model, out_dir / "adapter", base_model=base_model)
    tensors = {k: v.detach().contiguous().cpu() for k, v in value_head.state_dict().items()}
    atomic_write(out_dir / "value_head.safetensors", lambda tmp: save_file(tensors, str(tmp)))
    rows = read_metrics(out_dir / "metrics.jsonl")
    return {"out_dir": str(out_dir), "adapter": str(adapter), "plot": plot_ppo(rows, out_dir / "ppo.png"),
            "first_reward": rows[0]["reward"] if rows else None, "last_reward": rows[-1]["reward"] if rows else None,
            "max_kl": max((r["kl"] for r in rows), default=None)}


def read_prompts(path: str | Path, tokenizer, template: str, max_prompt_length: int) -> list[list[int]]:
    """Prompt token ids from JSONL records with "prompt" (preference data) or "instruction" (Alpaca), rendered
    as preferences.tokenize_pair renders them, so the reward model sees the format it was trained on."""
    from lmforge.training.data import render

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"prompt file {path} not found; give ppo.prompts a JSONL with a 'prompt' field per line")
    prompts = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        record = json.loads(line)
        text = record.get("prompt", record.get("instruction")) if isinstance(record, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{path}:{lineno}: missing field 'prompt' (or 'instruction'), a non-empty string")
        rendered, _ = render({"instruction": text, "input": "", "output": "-"}, template, tokenizer)
        ids = tokenizer.encode(rendered, add_special_tokens=template == "alpaca")
        if len(ids) <= max_prompt_length:
            prompts.append(ids)
    if not prompts:
        raise ValueError(f"{path}: no prompt fits ppo.max_prompt_length={max_prompt_length} tokens")
    return prompts


def build_reward(cfg: PPOConfig, policy_name: str, policy, tokenizer, device) -> RewardFn:
    """The recipe's reward: the trained reward model (checked against the policy's tokenizer) or a scripted one."""
    if cfg.reward == "token_fraction":
        return token_fraction_reward(cfg.reward_token_id)
    if cfg.reward == "length":
        return length_reward(cfg.target_length)
    if not cfg.reward_model:
        raise ValueError("ppo.reward=model needs ppo.reward_model: the folder `lmforge finetune --recipe reward` "
                         "wrote (out_dir/reward_model)")
    from lmforge.training.reward import check_reward_model, load_reward_model, reward_model_scorer

    check_reward_model(cfg.reward_model, policy_name, policy, tokenizer)
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    return reward_model_scorer(load_reward_model(cfg.reward_model, device), pad)


def run(recipe, merge: bool = False) -> dict:
    """`lmforge finetune --recipe ppo`: load the policy, add LoRA, read prompts, build the reward, run PPO."""
    from lmforge import hub
    from lmforge.checkpoint.load import load
    from lmforge.training.finetune import _device, default_data_dir, python_faq_dataset
    from lmforge.training.lora import apply_lora
    from lmforge.training.recipe import to_dict

    if merge:
        raise ValueError("--merge is not offered for PPO; the LoRA adapter is saved in out_dir/adapter")
    if recipe.adapter != "lora":
        raise ValueError(f"adapter={recipe.adapter!r}: PPO's reference is the policy with its LoRA adapter off; "
                         "set adapter: lora")
    out = Path(recipe.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.json").write_text(json.dumps(to_dict(recipe), indent=1))
    model, tokenizer = load(hub.resolve(recipe.model, pull_missing=recipe.model in hub.REGISTRY),
                            device=_device(recipe.device), dtype=torch.float32)
    cfg = recipe.ppo
    reward_fn = build_reward(cfg, recipe.model, model, tokenizer, next(model.parameters()).device)
    apply_lora(model, recipe.lora)
    source = cfg.prompts or str(python_faq_dataset(default_data_dir())[0])
    prompts = read_prompts(source, tokenizer, recipe.data.template, cfg.max_prompt_length)
    if tokenizer.eos_id is None:
        raise ValueError(f"{recipe.model}'s tokenizer has no EOS token; PPO responses end with EOS")
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    summary = run_ppo(model, prompts, reward_fn, cfg, recipe.train, out, tokenizer.eos_id, pad, recipe.model)
    return summary
