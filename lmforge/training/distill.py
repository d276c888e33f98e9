"""The distillation recipe, top to bottom: load the teacher, build the student, (cache the teacher's
top-k targets), train through the shared loop, save the student as a Hugging Face directory.

The student keeps the teacher's tokenizer. With init=teacher_layers it starts from evenly spaced
teacher layers (the first and the last included) plus the teacher's embeddings and final norm: DistilBERT
(Sanh et al. 2019, https://arxiv.org/abs/1910.01108) initialises from one layer in two; spreading the
picks keeps the input-side and output-side layers, whose roles the shallow student needs most.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from lmforge import hub
from lmforge.atomic import atomic_write, atomic_write_json
from lmforge.training.data import IGNORE_INDEX, Batches, Example, collate
from lmforge.training.objectives.distill import DistillConfig, distill_objective
from lmforge.training.objectives.forward import hidden_states
from lmforge.training.recipe import Recipe, to_dict
from lmforge.training.trainer import train


def teacher_layer_indices(n_teacher: int, n_student: int) -> list[int]:
    """Evenly spaced teacher layers, first and last included (30 -> 4: [0, 10, 19, 29])."""
    if n_student > n_teacher:
        raise ValueError(f"the student has {n_student} layers, more than the teacher's {n_teacher}")
    if n_student == 1:
        return [n_teacher - 1]
    return [round(i * (n_teacher - 1) / (n_student - 1)) for i in range(n_student)]


def check_vocab(teacher, student, teacher_name: str, student_name: str, teacher_tok=None, student_tok=None) -> None:
    """Distillation compares distributions over one vocabulary: refuse a teacher whose vocabulary differs."""
    tv, sv = teacher.config.vocab_size, student.config.vocab_size
    if tv != sv:
        raise ValueError(f"teacher {teacher_name} has a vocabulary of {tv} tokens, student {student_name} of {sv}; "
                         "the student must use the teacher's tokenizer (same vocab_size)")
    if teacher_tok is not None and student_tok is not None and \
            teacher_tok.backend.get_vocab() != student_tok.backend.get_vocab():
        raise ValueError(f"teacher {teacher_name} and student {student_name} have different tokenizers; "
                         "the student must use the teacher's tokenizer")


def init_from_teacher(student, teacher) -> list[int]:
    """Copy embeddings, final norm, head and evenly spaced layers of the teacher into the student."""
    picks = teacher_layer_indices(len(teacher.model.layers), len(student.model.layers))
    with torch.no_grad():
        student.model.embed_tokens.load_state_dict(teacher.model.embed_tokens.state_dict())
        student.model.norm.load_state_dict(teacher.model.norm.state_dict())
        if not student.config.tie_embeddings:
            student.lm_head.load_state_dict(teacher.lm_head.state_dict())
        for s_layer, t in zip(student.model.layers, picks):
            s_layer.load_state_dict(teacher.model.layers[t].state_dict())
    return picks


def build_student(cfg: DistillConfig, teacher, teacher_tok, device: torch.device):
    """(student, layers copied or None): a preset built here (teacher's tokenizer) or a checkpoint path."""
    from lmforge.config import PRESETS, Config
    from lmforge.model.transformer import build_model

    if cfg.student in PRESETS:
        student, student_tok = build_model(Config.from_name(cfg.student), device), None
    else:
        from lmforge.checkpoint.load import load

        student, student_tok = load(hub.resolve(cfg.student), device=device, dtype=torch.float32)
    check_vocab(teacher, student, cfg.teacher, cfg.student, teacher_tok, student_tok)
    picks = init_from_teacher(student, teacher) if cfg.init == "teacher_layers" else None
    for p in student.parameters():
        p.requires_grad_(True)
    return student.float(), picks


def cache_key(rows: list[list[Example]], teacher_name: str, teacher, k: int) -> str:
    """sha256 of the data's tokens and labels, the teacher's name, config and a weight fingerprint, and k."""
    h = hashlib.sha256()
    for row in rows:
        for ex in row:
            h.update(json.dumps([ex.input_ids, ex.labels]).encode())
    fingerprint = float(teacher.model.embed_tokens.weight.double().sum()) if hasattr(teacher, "model") else 0.0
    h.update(json.dumps([teacher_name, repr(teacher.config), fingerprint, k]).encode())
    return h.hexdigest()[:24]


@torch.no_grad()
def teacher_topk(teacher, batch: dict, k: int, chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k log-probs (L, k) and ids (L, k) at the batch's labelled positions, lm_head in chunks."""
    hidden = hidden_states(teacher, batch)[:, :-1][batch["labels"][:, 1:] != IGNORE_INDEX]
    lps, ids = [], []
    for start in range(0, hidden.shape[0], chunk):
        logp = F.log_softmax(teacher.logits(hidden[start:start + chunk]).float(), dim=-1)
        top = logp.topk(k, dim=-1)
        lps.append(top.values)
        ids.append(top.indices.to(torch.int32))
    return torch.cat(lps), torch.cat(ids)


def build_cache(teacher, rows: list[list[Example]], k: int, folder: Path, key: str, pad_id: int,
                rows_per_shard: int = 64, micro_batch: int = 4) -> Path:
    """Write the teacher's top-k targets per row as safetensors shards and index.json (written last, so a
    run killed midway leaves no index and the next run rebuilds); reuse a complete cache of the same key."""
    folder = Path(folder) / key
    index_path = folder / "index.json"
    if index_path.is_file() and json.loads(index_path.read_text()).get("key") == key:
        return folder
    device = next(teacher.parameters()).device
    teacher.eval()
    shards = []
    for s, start in enumerate(range(0, len(rows), rows_per_shard)):
        part, lps, ids, offsets = rows[start:start + rows_per_shard], [], [], [0]
        for b in range(0, len(part), micro_batch):
            batch = collate(part[b:b + micro_batch], pad_id)
            on_device = {name: v.to(device) if torch.is_tensor(v) else v for name, v in batch.items()}
            lp, idx = teacher_topk(teacher, on_device, k)
            per_row = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(dim=1).tolist()
            lps.append(lp.cpu())
            ids.append(idx.cpu())
            for n in per_row:
                offsets.append(offsets[-1] + n)
        tensors = {"logprobs": torch.cat(lps).contiguous(), "ids": torch.cat(ids).contiguous(),
                   "offsets": torch.tensor(offsets, dtype=torch.int64)}
        name = f"shard-{s:05d}.safetensors"
        atomic_write(folder / name, lambda tmp, t=tensors: save_file(t, str(tmp)))
        shards.append(name)
    atomic_write_json(index_path, {"key": key, "k": k, "rows": len(rows), "shards": shards,
                                   "note": "top-k teacher log-probs per labelled position, renormalised over k"})
    return folder


def read_cache(folder: Path) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per row: (logprobs (L_row, k), ids (L_row, k))."""
    index = json.loads((Path(folder) / "index.json").read_text())
    out = []
    for name in index["shards"]:
        t = load_file(str(Path(folder) / name))
        off = t["offsets"].tolist()
        out += [(t["logprobs"][a:b], t["ids"][a:b]) for a, b in zip(off[:-1], off[1:])]
    if len(out) != index["rows"]:
        raise ValueError(f"{folder}: teacher cache holds {len(out)} rows, index says {index['rows']}; delete it")
    return out


class CachedBatches(Batches):
    """Batches that also carry each row's cached teacher targets (teacher_logprobs, teacher_ids)."""

    def __init__(self, rows, targets, micro_batch: int, pad_id: int, seed: int = 0, shuffle: bool = True) -> None:
        super().__init__(rows, micro_batch, pad_id, seed, shuffle)
        if len(targets) != len(rows):
            raise ValueError(f"teacher cache has {len(targets)} rows for {len(rows)} data rows; delete the cache")
        self.targets = targets

    def next(self) -> dict[str, torch.Tensor]:
        if self.index >= len(self):
            self.epoch, self.index = self.epoch + 1, 0
        picked = self._order(self.epoch)[self.index * self.micro_batch:(self.index + 1) * self.micro_batch]
        self.index += 1
        batch = collate([self.rows[i] for i in picked], self.pad_id)
        batch["teacher_logprobs"] = torch.cat([self.targets[i][0] for i in picked])
        batch["teacher_ids"] = torch.cat([self.targets[i][1] for i in picked])
        return batch


def run(recipe: Recipe, merge: bool = False) -> dict:
    """Distil recipe.distill.teacher into the student; write out_dir/student (HF layout). `merge` is unused
    (the student is trained in full, nothing to merge)."""
    from lmforge.checkpoint.hf import save_pretrained
    from lmforge.checkpoint.load import load
    from lmforge.training.finetune import _device, sft_rows

    cfg, out = recipe.distill, Path(recipe.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.json").write_text(json.dumps(to_dict(recipe), indent=1))
    device = _device(recipe.device)
    teacher, tokenizer = load(hub.resolve(cfg.teacher, pull_missing=cfg.teacher in hub.REGISTRY),
                              device=device, dtype=torch.float32)
    student, picks = build_student(cfg, teacher, tokenizer, device)
    rows, pad, evals = sft_rows(recipe, tokenizer)
    if cfg.top_k and cfg.alpha > 0:
        folder = build_cache(teacher, rows, cfg.top_k, Path(cfg.cache_dir or out / "teacher_cache"),
                             cache_key(rows, cfg.teacher, teacher, cfg.top_k), pad)
        data = CachedBatches(rows, read_cache(folder), recipe.train.micro_batch, pad, seed=recipe.train.seed)
        objective = distill_objective(None, cfg)
        del teacher
    else:
        data = Batches(rows, recipe.train.micro_batch, pad, seed=recipe.train.seed)
        objective = distill_objective(teacher if cfg.alpha > 0 else None, cfg)
    summary = train(student, objective, data, recipe.train, out, eval_batches=evals)
    summary["student"] = str(save_pretrained(student, tokenizer, out / "student"))
    summary["teacher_layers"] = picks
    summary.pop("averaged", None)
    return summary
