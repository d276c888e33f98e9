"""Magnitude pruning: exact sparsity per matrix and globally, a truly global threshold, ties, report."""

from __future__ import annotations

import copy

import pytest
import torch

from lmforge.compression.prune import BLOCK_LINEARS, PruneConfig, magnitude_prune, smallest_masks, sparsity
from lmforge.config import Config
from lmforge.model.transformer import build_model, column_major_linears


def _model(name: str = "tiny-llama"):
    return build_model(Config.from_name(name))


def _block_linears(model):
    return {n: m for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in BLOCK_LINEARS}


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
@pytest.mark.parametrize("amount", [0.0, 0.3, 0.5, 0.77, 1.0])
def test_layer_scope_zeroes_exactly_the_smallest_of_each_matrix(name, amount):
    model = _model(name)
    before = {n: m.weight.detach().clone() for n, m in _block_linears(model).items()}
    report = magnitude_prune(model, PruneConfig(sparsity=amount, scope="layer"))
    for n, m in _block_linears(model).items():
        w0 = before[n].flatten()
        k = round(amount * w0.numel())
        assert int((m.weight == 0).sum()) == k, n
        zeroed = set(torch.argsort(w0.abs(), stable=True)[:k].tolist())  # brute force: the k smallest
        assert set((m.weight.flatten() == 0).nonzero().squeeze(1).tolist()) == zeroed
        kept = m.weight.flatten() != 0
        assert torch.equal(m.weight.flatten()[kept], w0[kept])  # survivors untouched
        assert report["matrices"][n] == k / w0.numel()
    assert set(report["matrices"]) == set(before)


def test_global_threshold_is_one_threshold_over_all_matrices():
    torch.manual_seed(1)
    model = _model()
    linears = _block_linears(model)
    with torch.no_grad():  # give matrices different scales so a per-layer cut would differ from a global one
        for i, m in enumerate(linears.values()):
            m.weight.mul_(0.5 + i)
    names = list(linears)
    flat = torch.cat([linears[n].weight.detach().flatten() for n in names])
    report = magnitude_prune(model, PruneConfig(sparsity=0.6, scope="global"))
    k = round(0.6 * flat.numel())
    order = torch.sort(flat.abs(), stable=True).indices  # brute force over every weight at once
    expected = torch.zeros_like(flat, dtype=torch.bool)
    expected[order[:k]] = True
    got = torch.cat([linears[n].weight.detach().flatten() == 0 for n in names])
    assert torch.equal(got, expected)
    assert report["zeros"] == k and report["numel"] == flat.numel()
    assert report["total"] == k / flat.numel() and report["scope"] == "global"
    per_matrix = sorted(report["matrices"].values())
    assert per_matrix[-1] - per_matrix[0] > 0.3  # the global cut prunes the small-scale matrices harder


def test_ties_are_broken_in_fixed_order_to_the_exact_count():
    a = torch.tensor([[1.0, -1.0, 2.0], [1.0, 3.0, -1.0]])
    b = torch.tensor([[-1.0, 5.0], [0.5, 1.0]])
    masks = smallest_masks([a.abs(), b.abs()], 4)
    # 0.5 first, then three of the seven 1's: the first ones in order (a row-major, then b)
    assert masks[0].tolist() == [[True, True, False], [True, False, False]]
    assert masks[1].tolist() == [[False, False], [True, False]]


def test_integer_valued_weights_still_reach_exact_sparsity():
    model = _model()
    with torch.no_grad():
        for m in _block_linears(model).values():
            m.weight.copy_(torch.randint(-2, 3, m.weight.shape).float())  # many exact ties and zeros
    report = magnitude_prune(model, PruneConfig(sparsity=0.7, scope="global"))
    assert report["zeros"] == round(0.7 * report["numel"])
    again = copy.deepcopy(model)
    magnitude_prune(again, PruneConfig(sparsity=0.7, scope="global"))
    assert all(torch.equal(a.weight, b.weight) for a, b in zip(_block_linears(model).values(),
                                                               _block_linears(again).values()))


def test_embeddings_norms_biases_and_head_are_left_alone_and_strides_kept():
    model = column_major_linears(_model("tiny-gpt2"))
    others = {n: p.detach().clone() for n, p in model.named_parameters()
              if not (n.endswith(".weight") and n.rsplit(".", 2)[-2] in BLOCK_LINEARS)}
    magnitude_prune(model, PruneConfig(sparsity=0.9))
    for n, p in model.named_parameters():
        if n in others:
            assert torch.equal(p, others[n]), n
    q = model.model.layers[0].self_attn.q_proj.weight
    assert q.t().is_contiguous() and not q.is_contiguous()


def test_targets_restrict_pruning_and_sparsity_helper_counts_zeros():
    model = _model()
    magnitude_prune(model, PruneConfig(sparsity=0.5, targets=["down_proj"]))
    report = sparsity(model)
    for n, s in report["matrices"].items():
        assert s == (0.5 if n.endswith("down_proj") else 0.0), n
    down = sum(m.weight.numel() for n, m in _block_linears(model).items() if n.endswith("down_proj"))
    assert report["zeros"] == down // 2


def test_pruned_model_runs_and_bad_configs_are_refused():
    model = _model()
    magnitude_prune(model, PruneConfig(sparsity=0.5))
    assert torch.isfinite(model(torch.randint(0, 256, (1, 8)))).all()
    with pytest.raises(ValueError, match="sparsity=1.5"):
        PruneConfig(sparsity=1.5)
    with pytest.raises(ValueError, match="scope='row'"):
        PruneConfig(scope="row")
    with pytest.raises(ValueError, match="no nn.Linear matches"):
        magnitude_prune(model, PruneConfig(targets=["embed_tokens"]))
