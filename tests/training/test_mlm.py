"""Masked-LM objective: exact 15% per row from real tokens only, the 80/10/10 split, labels on the chosen
tokens, seeded and resumable masking, packed rows kept apart, and a tiny encoder's loss going down."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmforge.config import Config
from lmforge.model.encoder import build_encoder
from lmforge.training.data import IGNORE_INDEX, Batches, Example, collate
from lmforge.training.mlm import MaskedBatches, attention_mask, choose, mask_tokens, mlm_loss
from lmforge.training.objectives import OBJECTIVES, count_loss_tokens
from lmforge.training.trainer import TrainConfig, evaluate, train

CLS, SEP, PAD, MASK, VOCAB = 256, 257, 258, 259, 260  # byte ids below 256


def _rows(texts: list[str], per_row: int = 1) -> list[list[Example]]:
    examples = [Example(ids := [CLS, *t.encode(), SEP], ids) for t in texts]
    return [examples[i:i + per_row] for i in range(0, len(examples), per_row)]


def test_choose_takes_round_15_percent_of_each_rows_maskable_tokens():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 60, (64,))
    maskable = torch.arange(60)[None, :] < lengths[:, None]
    maskable[:, 0] = False  # [CLS]
    chosen = choose(maskable, g)
    assert not bool((chosen & ~maskable).any())
    n = maskable.sum(1)
    expected = torch.where(n > 0, (n * 0.15).round().clamp(min=1), 0)
    assert torch.equal(chosen.sum(1), expected.long())


def test_80_10_10_split_and_labels_on_chosen_tokens():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 1000, (400, 250))
    maskable = torch.ones_like(ids, dtype=torch.bool)
    inputs, labels = mask_tokens(ids, maskable, mask_id=1000, vocab_size=1001, generator=g)
    chosen = labels != IGNORE_INDEX
    assert int(chosen.sum()) == 400 * round(250 * 0.15)
    assert torch.equal(labels[chosen], ids[chosen]) and torch.equal(inputs[~chosen], ids[~chosen])
    masked = (inputs[chosen] == 1000).float().mean().item()
    unchanged = (inputs[chosen] == ids[chosen]).float().mean().item()
    random = 1 - masked - unchanged
    assert masked == pytest.approx(0.8, abs=0.012)
    assert unchanged == pytest.approx(0.1 + 0.1 / 1001, abs=0.01)  # a random id may equal the original
    assert random == pytest.approx(0.1 - 0.1 / 1001, abs=0.01)


def test_masking_is_seeded():
    ids = torch.randint(0, 100, (8, 40))
    maskable = torch.ones_like(ids, dtype=torch.bool)
    run = lambda seed: mask_tokens(ids, maskable, 100, 101, torch.Generator().manual_seed(seed))  # noqa: E731
    assert all(torch.equal(a, b) for a, b in zip(run(3), run(3)))
    assert not torch.equal(run(3)[1], run(4)[1])


def test_masked_batches_skip_padding_and_specials_resume_and_count_labels():
    texts = [f"sentence number {i} " * (1 + i % 3) for i in range(12)]
    fresh = lambda: MaskedBatches(Batches(_rows(texts), 4, PAD, seed=0), MASK, VOCAB, (CLS, SEP), seed=5)  # noqa: E731
    data = fresh()
    seen = [data.next() for _ in range(4)]
    state = data.state()
    after = [data.next() for _ in range(3)]
    resumed = fresh()
    resumed.load_state(state)
    for a, b in zip(after, (resumed.next() for _ in range(3))):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    for batch in seen + after:
        chosen = batch["labels"] != IGNORE_INDEX
        original = torch.where(chosen, batch["labels"], batch["input_ids"])
        assert not bool(torch.isin(original[chosen], torch.tensor([CLS, SEP, PAD])).any())
        assert count_loss_tokens(batch) == int(chosen.sum())  # label_shift 0: column 0 counts too
    evals = fresh().all()
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(evals, fresh().all()))
    with pytest.raises(ValueError, match="mask_id=300"):
        MaskedBatches(Batches(_rows(texts), 4, PAD), 300, VOCAB)


def _tiny(**overrides):
    torch.manual_seed(0)
    return build_encoder(Config.from_name("tiny-bert", vocab_size=VOCAB, **overrides))


def test_mlm_loss_is_mean_cross_entropy_on_chosen_tokens():
    model = _tiny().eval()
    batch = MaskedBatches(Batches(_rows(["hello world", "a longer sentence here"]), 2, PAD), MASK, VOCAB,
                          (CLS, SEP)).next()
    with torch.no_grad():
        valid = batch["valid"].long()
        logits = model.mlm_logits(model(batch["input_ids"], valid))  # padded forward, full vocab logits
        keep = batch["labels"] != IGNORE_INDEX
        expected = F.cross_entropy(logits[keep], batch["labels"][keep])
        assert float(mlm_loss(model, batch)) == pytest.approx(float(expected), rel=1e-5)
    assert OBJECTIVES["mlm"] is mlm_loss


def test_packed_examples_see_only_themselves():
    model = _tiny().eval()
    texts = ["first example", "second one, longer", "third"]
    packed = collate(_rows(texts, per_row=3), PAD)
    assert "seq_ids" in packed
    with torch.no_grad():
        together = model.hidden_states(packed["input_ids"], attention_mask(packed), positions=packed["positions"])
        start = 0
        for text in texts:
            ids = torch.tensor([[CLS, *text.encode(), SEP]])
            alone = model(ids)
            torch.testing.assert_close(together[:, start:start + ids.shape[1]], alone, atol=1e-5, rtol=1e-5)
            start += ids.shape[1]


@pytest.fixture
def one_thread():
    """A 64-wide model gains nothing from a second thread, and on a shared machine each tiny op would wait for it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_tiny_encoder_mlm_loss_goes_down(tmp_path, one_thread):
    words = "the cat sat on the mat and the dog ran to the park while the bird sang in the tree".split()
    texts = [" ".join(words[i:i + 8]) for i in range(0, len(words) - 8)] * 4
    model = _tiny(block_size=64)
    data = MaskedBatches(Batches(_rows(texts), 8, PAD, seed=0), MASK, VOCAB, (CLS, SEP), seed=0)
    held_out = data.all()
    before = evaluate(model, mlm_loss, held_out)
    cfg = TrainConfig(max_steps=60, micro_batch=8, lr=3e-3, warmup_steps=5, eval_every=0, save_every=0,
                      gradient_checkpointing=False, precision="fp32", progress=False)
    summary = train(model, mlm_loss, data, cfg, tmp_path, eval_batches=held_out)
    assert summary["final_eval_loss"] < 0.6 * before, (before, summary["final_eval_loss"])
