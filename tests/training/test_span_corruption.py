"""T5 span corruption: the noise mask has the paper's density and span count and starts with kept
tokens, inputs and targets interleave back into the original, a hand-worked example comes out as T5
lays it out, and the loss equals transformers' T5ForConditionalGeneration loss on the same batch."""

from __future__ import annotations

import pytest
import torch

from lmforge.checkpoint.load import load_model
from lmforge.training.data import IGNORE_INDEX
from lmforge.training.span_corruption import collate, corrupt, noise_mask, span_corruption_loss

transformers = pytest.importorskip("transformers")
SENTINELS = [100 - i for i in range(1, 40)]  # <extra_id_0> is the last id, counting down, as T5's vocabulary


def spans(mask: torch.Tensor) -> int:
    return int((mask & ~torch.cat([torch.tensor([False]), mask[:-1]])).sum())


@pytest.mark.parametrize("length", [2, 7, 64, 513])
def test_noise_mask_density_and_spans(length):
    g = torch.Generator().manual_seed(length)
    mask = noise_mask(length, g)
    n_noise = min(max(round(length * 0.15), 1), length - 1)
    assert mask.shape == (length,) and int(mask.sum()) == n_noise
    assert not bool(mask[0])  # T5 starts with a kept segment
    assert spans(mask) == max(1, min(round(n_noise / 3), n_noise, length - n_noise))


def test_masks_differ_by_seed():
    a, b = (noise_mask(100, torch.Generator().manual_seed(s)) for s in (0, 1))
    assert not torch.equal(a, b)


def test_hand_worked_example():
    tokens = list(range(10, 20))
    mask = torch.zeros(10, dtype=torch.bool)
    mask[[2, 3, 7]] = True
    inputs, targets = corrupt(tokens, mask, [99, 98], eos_id=1)
    assert inputs == [10, 11, 99, 14, 15, 16, 98, 18, 19, 1]
    assert targets == [99, 12, 13, 98, 17, 1]


def test_inputs_and_targets_rebuild_the_original():
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(2, 60, (200,)).tolist()
    inputs, targets = corrupt(tokens, noise_mask(200, g), SENTINELS, eos_id=1)
    filled = {s: [] for s in SENTINELS}
    current = None
    for t in targets[:-1]:
        if t in filled:
            current = t
        else:
            filled[current].append(t)
    rebuilt = [x for t in inputs[:-1] for x in (filled[t] if t in filled else [t])]
    assert rebuilt == tokens


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="length=1"):
        noise_mask(1, torch.Generator())
    mask = torch.tensor([False, True, False, True])
    with pytest.raises(ValueError, match="2 noise spans but 1 sentinel"):
        corrupt([5, 6, 7, 8], mask, [99], eos_id=1)


def test_loss_equals_transformers(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                                relative_attention_num_buckets=8, dropout_rate=0.0, feed_forward_proj="gated-gelu",
                                decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    ref = transformers.T5ForConditionalGeneration(cfg).eval()
    ref.save_pretrained(tmp_path)
    model = load_model(tmp_path)
    g = torch.Generator().manual_seed(0)
    pairs = [corrupt(torch.randint(2, 60, (n,)).tolist(), noise_mask(n, g), SENTINELS, eos_id=1) for n in (40, 23)]
    batch = collate(pairs, pad_id=0, decoder_start_id=0)
    assert (batch["labels"][1] == IGNORE_INDEX).any()  # the shorter row is padded
    with torch.no_grad():
        want = ref(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        got = span_corruption_loss(model, batch)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    model.train()
    span_corruption_loss(model, batch).backward()
    assert model.shared.weight.grad.abs().sum() > 0
    assert model.encoder.block[0].layer[0].SelfAttention.q.weight.grad.abs().sum() > 0
