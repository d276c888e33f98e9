"""Merging: averages, soups, task arithmetic and TIES against hand-computed results; mismatch errors."""

from __future__ import annotations

import copy

import pytest
import torch

from lmforge.compression.merge import (MergeConfig, greedy_soup, merge, task_arithmetic, ties, trim, uniform_soup,
                                       weighted_average)
from lmforge.config import Config
from lmforge.model.transformer import build_model


def _model(seed: int, **overrides):
    torch.manual_seed(seed)
    return build_model(Config.from_name("tiny-llama", **overrides))


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_average_of_copies_is_the_model_and_weights_one_zero_give_the_first():
    a, b = _model(0), _model(1)
    assert _equal(weighted_average([a, copy.deepcopy(a)]), a.state_dict())
    assert _equal(uniform_soup([a.state_dict(), a.state_dict()]), a.state_dict())
    assert _equal(weighted_average([a, b], [1.0, 0.0]), a.state_dict())
    assert _equal(merge([a, b], MergeConfig(weights=[0.0, 3.0])), b.state_dict())


def test_weighted_average_normalises_the_weights():
    a, b = {"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([5.0, -2.0])}
    torch.testing.assert_close(weighted_average([a, b], [3, 1])["w"], torch.tensor([2.0, 1.0]))
    torch.testing.assert_close(uniform_soup([a, b])["w"], torch.tensor([3.0, 0.0]))
    for bad in ([1.0, -1.0], [0.0, 0.0], [1.0], [float("nan"), 1.0]):
        with pytest.raises(ValueError, match="merge weights"):
            weighted_average([a, b], bad)


def test_merged_state_loads_and_runs():
    a, b = _model(0), _model(1)
    merged_model = copy.deepcopy(a)
    merged_model.load_state_dict(weighted_average([a, b]))
    ids = torch.randint(0, 256, (1, 6))
    with torch.no_grad():
        expected = 0.5 * (a.model.layers[0].mlp.up_proj.weight + b.model.layers[0].mlp.up_proj.weight)
        torch.testing.assert_close(merged_model.model.layers[0].mlp.up_proj.weight, expected)
        assert torch.isfinite(merged_model(ids)).all()


def test_task_arithmetic_with_lambda_one_reproduces_the_fine_tuned_model():
    base, ft = _model(0), _model(1)
    assert _equal(task_arithmetic(base, [ft]), ft.state_dict())
    assert _equal(merge([ft], MergeConfig(method="task_arithmetic", lambdas=[0.0]), base=base), base.state_dict())


def test_task_arithmetic_sums_scaled_task_vectors():
    base = {"w": torch.tensor([1.0, 1.0, 1.0])}
    ft1, ft2 = {"w": torch.tensor([2.0, 1.0, 0.0])}, {"w": torch.tensor([1.0, 3.0, 1.0])}
    got = task_arithmetic(base, [ft1, ft2], [0.5, -1.0])["w"]
    torch.testing.assert_close(got, torch.tensor([1.5, -1.0, 0.5]))  # 1 + 0.5 [1, 0, -1] - [0, 2, 0]
    with pytest.raises(ValueError, match="1 lambdas for 2"):
        task_arithmetic(base, [ft1, ft2], [1.0])


def test_ties_equals_hand_computed_merge():
    base = {"w": torch.zeros(2, 3)}
    t1 = torch.tensor([[0.5, -2.0, 0.1], [3.0, 0.2, -1.0]])
    t2 = torch.tensor([[-1.0, -1.5, 0.3], [-4.0, 0.05, 2.0]])
    t3 = torch.tensor([[2.0, 0.1, -0.2], [1.0, 0.01, -3.0]])
    # density 0.5: each task vector keeps its 3 largest magnitudes
    #   trim(t1) = [[0, -2, 0], [3, 0, -1]]; trim(t2) = [[0, -1.5, 0], [-4, 0, 2]]; trim(t3) = [[2, 0, 0], [1, 0, -3]]
    # sums:       [[2, -3.5, 0], [0, 0, -2]] -> elected signs [[+, -, 0], [0, 0, -]] ((1,0) cancels: 3 - 4 + 1)
    # disjoint means over the non-zero agreeing values: (0,0): 2 / 1; (0,1): (-2 - 1.5) / 2; (1,2): (-1 - 3) / 2
    expected = 0.7 * torch.tensor([[2.0, -1.75, 0.0], [0.0, 0.0, -2.0]])
    got = ties(base, [{"w": t1}, {"w": t2}, {"w": t3}], density=0.5, scale=0.7)["w"]
    torch.testing.assert_close(got, expected)
    assert torch.equal(trim(t1, 0.5), torch.tensor([[0.0, -2.0, 0.0], [3.0, 0.0, -1.0]]))


def test_ties_with_a_base_adds_the_scaled_merged_vector_and_full_density_one_model_is_task_arithmetic():
    base = {"w": torch.tensor([1.0, -1.0, 2.0, 0.0])}
    ft1, ft2 = {"w": torch.tensor([2.0, -1.0, 1.0, 0.5])}, {"w": torch.tensor([3.0, 0.0, 1.5, -0.5])}
    # task vectors [1, 0, -1, 0.5], [2, 1, -0.5, -0.5]; density 1 keeps all; sums [3, 1, -1.5, 0]
    # signs [+, +, -, 0]; means [1.5, 1, -0.75, 0]
    got = merge([ft1, ft2], MergeConfig(method="ties", density=1.0, scale=2.0), base=base)["w"]
    torch.testing.assert_close(got, torch.tensor([4.0, 1.0, 0.5, 0.0]))
    a, b = _model(0), _model(1)
    merged = ties(a, [b], density=1.0, scale=1.0)
    for k, v in b.state_dict().items():
        torch.testing.assert_close(merged[k], v)


def test_greedy_soup_keeps_only_models_that_improve_the_eval():
    target = torch.tensor([1.0, 1.0])
    models = [{"w": torch.tensor([0.0, 0.0])}, {"w": torch.tensor([1.2, 0.8])},  # index 1: the best alone
              {"w": torch.tensor([0.8, 1.2])}, {"w": torch.tensor([5.0, -5.0])}]
    calls = []

    def evaluate(state):
        calls.append(state["w"].clone())
        return -float((state["w"] - target).norm())

    soup, kept = greedy_soup(models, evaluate)
    # ranked 1 (-0.28), 2 (-0.28), 0 (-1.41), 3; 1+2 averages to the target exactly (kept), then
    # adding 0 ([0.67, 0.67]) or 3 ([2.33, -1]) makes it worse, so neither is kept
    assert kept == [1, 2]
    torch.testing.assert_close(soup["w"], target)
    assert len(calls) == 4 + 3  # every model alone, then one candidate soup per remaining model


def test_mismatched_architectures_name_the_first_bad_key_or_shape():
    a = _model(0)
    wider = _model(1, intermediate_size=96)
    with pytest.raises(ValueError, match=r"'model.layers.0.mlp.gate_proj.weight' has shape \(96, 64\) in model 1 "
                                         r"but \(128, 64\) in model 0"):
        weighted_average([a, wider])
    deeper = _model(1, n_layer=3)
    with pytest.raises(ValueError, match="model 1 has 'model.layers.2.input_layernorm.weight', which model 0 lacks"):
        weighted_average([a, deeper])
    with pytest.raises(ValueError, match="fine-tuned model 0 has 'model.layers.2.input_layernorm.weight', which base"):
        task_arithmetic(a, [deeper])
    with pytest.raises(ValueError, match="needs the base model"):
        merge([a, a], MergeConfig(method="ties"))


def test_non_float_buffers_must_be_equal_and_are_copied():
    a = {"w": torch.tensor([1.0, 3.0]), "step": torch.tensor([7])}
    b = {"w": torch.tensor([3.0, 5.0]), "step": torch.tensor([7])}
    out = weighted_average([a, b])
    assert torch.equal(out["step"], torch.tensor([7])) and out["step"].dtype == torch.long
    torch.testing.assert_close(out["w"], torch.tensor([2.0, 4.0]))
    with pytest.raises(ValueError, match="non-float tensor 'step' differs between model 0 and model 1"):
        weighted_average([a, {**b, "step": torch.tensor([8])}])


def test_dtype_is_kept():
    a = {"w": torch.tensor([1.0, 2.0], dtype=torch.bfloat16)}
    b = {"w": torch.tensor([3.0, 4.0], dtype=torch.bfloat16)}
    out = weighted_average([a, b])["w"]
    assert out.dtype == torch.bfloat16 and out.tolist() == [2.0, 3.0]
