"""Distillation: the loss against torch's kl_div by hand (temperature, chunking), alpha=0 as plain CE,
gradients to the student only, top-k cache (k = vocab) equal to on-the-fly, student init and bad vocab."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmforge.config import Config
from lmforge.model.transformer import build_model
from lmforge.training.data import IGNORE_INDEX, Example, collate
from lmforge.training.distill import (CachedBatches, build_cache, cache_key, check_vocab, init_from_teacher,
                                      read_cache, teacher_layer_indices)
from lmforge.training.objectives.distill import DistillConfig, distill_loss, distill_preset, distill_terms
from lmforge.training.objectives.sft import sft_loss


def _models(seed: int = 0):
    torch.manual_seed(seed)
    student = build_model(Config.from_name("tiny-llama"))
    teacher = build_model(Config.from_name("tiny-llama", n_layer=4))
    teacher.eval().requires_grad_(False)
    return student, teacher


def _rows(n: int = 6, seed: int = 1) -> list[list[Example]]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        ids = torch.randint(0, 256, (10 + 3 * i,), generator=g).tolist()
        labels = [IGNORE_INDEX] * 4 + ids[4:]
        rows.append([Example(ids, labels)])
    return rows


def _reference(student, teacher, batch, alpha: float, T: float) -> torch.Tensor:
    """The loss from full logits and F.kl_div / F.cross_entropy, no chunking."""
    s = student(batch["input_ids"])[:, :-1]
    t = teacher(batch["input_ids"])[:, :-1]
    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE_INDEX
    s, t = s[keep].float(), t[keep].float()
    kl = F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), log_target=True, reduction="sum")
    ce = F.cross_entropy(s, labels[keep], reduction="sum")
    return (alpha * T * T * kl + (1 - alpha) * ce) / keep.sum()


@pytest.mark.parametrize("alpha,T,chunk", [(0.5, 2.0, 7), (1.0, 4.0, 256), (0.3, 1.0, 1)])
def test_loss_equals_kl_div_by_hand(alpha, T, chunk):
    student, teacher = _models()
    student.train()
    batch = collate(_rows(3), pad_id=0)
    ce, kl = distill_terms(student, batch, teacher, DistillConfig(alpha=alpha, temperature=T), chunk=chunk)
    n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    got = (alpha * T * T * kl + (1 - alpha) * ce) / n
    torch.testing.assert_close(got, _reference(student, teacher, batch, alpha, T), rtol=1e-5, atol=1e-5)
    full = distill_loss(student, batch, teacher, DistillConfig(alpha=alpha, temperature=T))
    torch.testing.assert_close(full, got, rtol=1e-5, atol=1e-5)


def test_alpha_zero_is_plain_ce():
    student, teacher = _models()
    student.train()
    batch = collate(_rows(3), pad_id=0)
    torch.testing.assert_close(distill_loss(student, batch, teacher, DistillConfig(alpha=0.0)),
                               sft_loss(student, batch), rtol=1e-6, atol=1e-6)
    assert distill_preset("hard").alpha == 0.0


def test_eval_mode_is_plain_ce():
    student, teacher = _models()
    student.eval()
    batch = collate(_rows(2), pad_id=0)
    torch.testing.assert_close(distill_loss(student, batch, teacher, DistillConfig(alpha=0.9)),
                               sft_loss(student, batch), rtol=1e-6, atol=1e-6)


def test_gradients_reach_the_student_only_and_match_unchunked():
    student, teacher = _models()
    student.train()
    teacher.requires_grad_(True)  # even a teacher left trainable gets no gradient
    batch = collate(_rows(3), pad_id=0)
    distill_loss(student, {**batch}, teacher, DistillConfig(alpha=0.7, temperature=2.0)).backward()
    assert all(p.grad is None for p in teacher.parameters())
    grads = {n: p.grad.clone() for n, p in student.named_parameters()}
    assert all(g.abs().sum() > 0 for g in grads.values())
    student.zero_grad()
    _reference(student, teacher, batch, 0.7, 2.0).backward()
    for n, p in student.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-6)


def test_cached_topk_with_k_vocab_equals_on_the_fly(tmp_path):
    student, teacher = _models()
    student.train()
    rows = _rows(6)
    key = cache_key(rows, "tiny-teacher", teacher, 256)
    folder = build_cache(teacher, rows, 256, tmp_path, key, pad_id=0, rows_per_shard=4, micro_batch=2)
    assert (folder / "index.json").is_file() and len(list(folder.glob("shard-*.safetensors"))) == 2
    data = CachedBatches(rows, read_cache(folder), micro_batch=3, pad_id=0, seed=0)
    cfg = DistillConfig(alpha=0.6, temperature=3.0)
    for _ in range(3):
        batch = data.next()
        cached = distill_loss(student, batch, None, cfg)
        plain = {k: v for k, v in batch.items() if not k.startswith("teacher_")}
        torch.testing.assert_close(cached, distill_loss(student, plain, teacher, cfg), rtol=1e-5, atol=1e-5)
    assert build_cache(teacher, rows, 256, tmp_path, key, pad_id=0) == folder  # reused, keyed by data + teacher
    assert cache_key(rows[:-1], "tiny-teacher", teacher, 256) != key


def test_smaller_k_renormalises_over_the_top_k(tmp_path):
    student, teacher = _models()
    rows = _rows(2)
    folder = build_cache(teacher, rows, 8, tmp_path, "k8", pad_id=0)
    (lp, ids), _ = read_cache(folder)
    assert lp.shape[1] == 8 and (lp <= 0).all()  # stored as log-probs of the full softmax
    full = F.log_softmax(teacher(collate(rows[:1], 0)["input_ids"])[0, :-1].float(), -1)[4 - 1:]
    torch.testing.assert_close(lp, full.topk(8, -1).values, rtol=1e-5, atol=1e-5)


def test_teacher_layer_init_and_vocab_check():
    assert teacher_layer_indices(30, 4) == [0, 10, 19, 29]
    student, teacher = _models()
    picks = init_from_teacher(student, teacher)
    assert picks == [0, 3]
    torch.testing.assert_close(student.model.layers[1].mlp.up_proj.weight, teacher.model.layers[3].mlp.up_proj.weight)
    torch.testing.assert_close(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    other = build_model(Config.from_name("tiny-llama", vocab_size=300))
    with pytest.raises(ValueError, match="teacher big-teacher.*300.*student small-student.*256"):
        check_vocab(other, student, "big-teacher", "small-student")
    assert Config.from_name("smollm2-student-4l").vocab_size == Config.from_name("smollm2-135m").vocab_size
