"""Structured pruning: the narrow model equals the original with the removed units zeroed out."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from lmforge.checkpoint.hf import save_hf
from lmforge.checkpoint.load import load_model
from lmforge.compression.structured import (StructuredConfig, activation_scores, count_parameters, prune_structured,
                                            recover, remove_kv_groups, remove_neurons, weight_head_scores,
                                            weight_neuron_scores)
from lmforge.config import Config
from lmforge.generation.kv_cache import KVCache
from lmforge.model.linear import is_plain_linear
from lmforge.model.transformer import build_model, column_major_linears

IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(5))


def _model(name: str):
    model = build_model(Config.from_name(name))
    with torch.no_grad():  # non-zero biases, so a bias that should be dropped or kept is noticed
        for n, p in model.named_parameters():
            if n.endswith("_proj.bias"):
                p.normal_(0, 0.02)
    return model.eval()


def _masked(model, heads: list[list[int]], neurons: list[list[int]]):
    """A copy of the original with the given query heads' o_proj columns and neurons' down_proj columns zeroed."""
    masked = copy.deepcopy(model)
    hd = model.config.head_dim
    with torch.no_grad():
        for layer, hs, ns in zip(masked.model.layers, heads, neurons):
            for h in hs:
                layer.self_attn.o_proj.weight[:, h * hd:(h + 1) * hd] = 0
            for j in ns:
                layer.mlp.down_proj.weight[:, j] = 0
    return masked


def _expected_removed_params(config: Config, groups: int, neurons: int) -> int:
    E, hd, r = config.n_embd, config.head_dim, config.n_head // config.n_kv_head
    b = 1 if config.bias else 0
    attn = groups * (r * hd * E + r * hd * b + 2 * (hd * E + hd * b) + r * hd * E)  # q rows, k/v rows, o columns
    n_in = 2 if config.mlp != "gelu" else 1  # gate and up, or up alone
    mlp = neurons * (n_in * (E + b) + E)
    return config.n_layer * (attn + mlp)


@pytest.mark.parametrize("name,groups,neurons", [("tiny-llama", 1, 40), ("tiny-gpt2", 2, 100), ("tiny-gemma3", 0, 32)])
@pytest.mark.parametrize("score", ["weight", "activation"])
def test_pruned_model_equals_original_with_units_zeroed(name, groups, neurons, score):
    model = _model(name)
    original = copy.deepcopy(model)
    before = original.config
    pruned, report = prune_structured(model, StructuredConfig(kv_groups=groups, neurons=neurons, score=score),
                                      calibration=IDS if score == "activation" else None)
    reference = _masked(original, report.removed_heads, report.removed_neurons)
    with torch.no_grad():
        torch.testing.assert_close(pruned(IDS), reference(IDS))
        assert not torch.allclose(original(IDS), reference(IDS))  # the removed units did matter
    r = before.n_head // before.n_kv_head
    c = pruned.config
    assert (c.n_kv_head, c.n_head, c.head_dim) == (before.n_kv_head - groups, (before.n_kv_head - groups) * r,
                                                   before.head_dim)
    assert c.intermediate_size == before.intermediate_size - neurons
    assert all(len(x) == groups for x in report.removed_kv_heads)
    assert all(len(x) == groups * r for x in report.removed_heads)
    assert all(len(x) == neurons for x in report.removed_neurons)
    assert report.params_before == count_parameters(original)
    assert report.params_before - report.params_after == _expected_removed_params(before, groups, neurons)
    assert report.params_after == count_parameters(pruned)
    layer = pruned.model.layers[0]
    assert layer.self_attn.q_proj.weight.shape == (c.n_head * c.head_dim, c.n_embd)
    assert layer.mlp.down_proj.weight.shape == (c.n_embd, c.intermediate_size)


def test_weight_scores_pick_the_lowest_norm_units_per_layer():
    model = _model("tiny-llama")
    with torch.no_grad():  # make layer 0's group 1 and layer 1's group 0 tiny; neurons 3 / 7 likewise
        a0, a1 = model.model.layers[0].self_attn, model.model.layers[1].self_attn
        hd = model.config.head_dim
        a0.k_proj.weight[hd:2 * hd] *= 0.01
        a0.q_proj.weight[2 * hd:4 * hd] *= 0.01
        a1.v_proj.weight[:hd] *= 0.01
        a1.o_proj.weight[:, :2 * hd] *= 0.01
        model.model.layers[0].mlp.up_proj.weight[3] *= 0.01
        model.model.layers[1].mlp.down_proj.weight[:, 7] *= 0.01
    for layer, scores in zip(model.model.layers, weight_head_scores(model)):  # independent recomputation
        a, hd, r = layer.self_attn, model.config.head_dim, 2
        q_rows = [slice(g * r * hd, (g + 1) * r * hd) for g in range(2)]
        kv_rows = [slice(g * hd, (g + 1) * hd) for g in range(2)]
        ref = [a.q_proj.weight[q].norm() + a.k_proj.weight[kv].norm() + a.v_proj.weight[kv].norm()
               + a.o_proj.weight[:, q].norm() for q, kv in zip(q_rows, kv_rows)]
        torch.testing.assert_close(scores, torch.stack(ref).detach())
    mlp = model.model.layers[1].mlp
    j = 5
    ref = mlp.gate_proj.weight[j].norm() * mlp.up_proj.weight[j].norm() * mlp.down_proj.weight[:, j].norm()
    torch.testing.assert_close(weight_neuron_scores(model)[1][j], ref.detach())
    _, report = prune_structured(model, StructuredConfig(kv_groups=1, neurons=1, score="weight"))
    assert report.removed_kv_heads == [[1], [0]]
    assert report.removed_heads == [[2, 3], [0, 1]]
    assert report.removed_neurons == [[3], [7]]


def _sublayer_output(model, module_name: str, ids):
    out = {}
    handle = model.get_submodule(module_name).register_forward_hook(lambda m, a, y: out.setdefault("y", y))
    with torch.no_grad():
        model(ids)
    handle.remove()
    return out["y"]


def test_activation_scores_are_mean_contribution_norms():
    model = _model("tiny-llama")
    heads, neurons = activation_scores(model, [IDS[:1], IDS[1:]])  # 24 calibration tokens in two batches
    name = "model.layers.1.self_attn"
    full = _sublayer_output(model, name, IDS)
    for g, query_heads in enumerate([[0, 1], [2, 3]]):  # contribution = output minus output without the group
        diff = full - _sublayer_output(_masked(model, [[], query_heads], [[], []]), name, IDS)
        torch.testing.assert_close(heads[1][g], diff.norm(dim=-1).mean(), rtol=1e-4, atol=1e-6)
    name = "model.layers.0.mlp"
    full = _sublayer_output(model, name, IDS)
    for j in (5, 9):
        diff = full - _sublayer_output(_masked(model, [[], []], [[j], []]), name, IDS)
        torch.testing.assert_close(neurons[0][j], diff.norm(dim=-1).mean(), rtol=1e-4, atol=1e-6)


def test_pruned_gqa_model_decodes_with_kv_cache_and_round_trips_through_hf(tmp_path):
    model = column_major_linears(_model("tiny-llama"))
    pruned, _ = prune_structured(model, StructuredConfig(kv_groups=1, neurons=32, score="weight"))
    q = pruned.model.layers[0].self_attn.q_proj.weight
    assert q.t().is_contiguous() and not q.is_contiguous()  # the layout of the loaded weights is kept
    with torch.no_grad():
        full = pruned(IDS)
        cache = KVCache(pruned.config, batch_size=2, max_len=16)
        assert cache.k[0].shape[1] == 1  # one KV head left
        prefill = pruned(IDS[:, :8], cache=cache)
        steps = [pruned(IDS[:, t:t + 1], cache=cache) for t in range(8, 12)]
    torch.testing.assert_close(torch.cat([prefill] + steps, dim=1), full, rtol=1e-4, atol=1e-5)
    save_hf(pruned, tmp_path / "pruned")
    loaded = load_model(tmp_path / "pruned")
    assert (loaded.config.n_head, loaded.config.n_kv_head, loaded.config.head_dim,
            loaded.config.intermediate_size) == (2, 1, 16, 96)
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS), full)


def test_mha_model_with_biases_generates_after_pruning():
    pruned, _ = prune_structured(_model("tiny-gpt2"), StructuredConfig(kv_groups=3, neurons=200), IDS)
    assert (pruned.config.n_head, pruned.config.n_kv_head, pruned.config.intermediate_size) == (1, 1, 56)
    ids = IDS[:, :4]
    with torch.no_grad():
        cache = KVCache(pruned.config, batch_size=2, max_len=12)
        logits = pruned(ids, cache=cache)
        for _ in range(4):  # greedy decoding through the cache equals recomputing the whole prefix
            nxt = logits[:, -1:].argmax(-1)
            ids = torch.cat([ids, nxt], dim=1)
            logits = pruned(nxt, cache=cache)
            torch.testing.assert_close(logits[:, -1], pruned(ids)[:, -1], rtol=1e-4, atol=1e-5)


def test_explicit_removal_and_bad_requests():
    model = _model("tiny-llama")
    original = copy.deepcopy(model)
    remove_kv_groups(model, [[0], [1]])
    remove_neurons(model, [[0, 127], [64, 65]])
    ref = _masked(original, [[0, 1], [2, 3]], [[0, 127], [64, 65]])
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), ref(IDS))
    with pytest.raises(ValueError, match="same number of units"):
        remove_neurons(model, [[0], [1, 2]])
    with pytest.raises(ValueError, match="kv_groups=1 must be < n_kv_head=1"):
        prune_structured(model, StructuredConfig(kv_groups=1))
    with pytest.raises(ValueError, match="needs calibration"):
        prune_structured(model, StructuredConfig(neurons=1, score="activation"))
    with pytest.raises(ValueError, match="neurons=-1"):
        StructuredConfig(neurons=-1)


def test_recover_lowers_the_loss_of_the_pruned_model(tmp_path):
    torch.manual_seed(0)
    pattern = (torch.arange(32) % 4 + 10).repeat(4, 1)  # (4, 32): a repeating sequence the model can learn
    pruned, _ = prune_structured(_model("tiny-llama"), StructuredConfig(kv_groups=1, neurons=64, score="weight"))

    def loss() -> float:  # mean next-token cross-entropy over every token, computed here
        with torch.no_grad():
            logits = pruned(pattern)[:, :-1]
        return float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), pattern[:, 1:].reshape(-1)))

    before = loss()
    summary = recover(pruned, pattern, steps=15, out_dir=tmp_path / "recover", lr=1e-2)
    after = loss()
    assert after < 0.85 * before
    assert summary["loss_before"] == pytest.approx(before, rel=1e-4)
    assert summary["loss_after"] == pytest.approx(after, rel=1e-4)
    assert is_plain_linear(pruned.model.layers[0].mlp.up_proj)  # adapters merged away
    assert pruned.model.layers[0].mlp.up_proj.weight.shape == (64, 64)


CALIBRATION_TEXT = (
    "The river runs past the old mill and under the stone bridge before it reaches the town. In spring the water "
    "rises and the children watch the boats carry timber down to the harbour, where the merchants weigh it and "
    "argue about the price. The baker opens his shop at dawn, and by noon the bread is gone. In the evening the "
    "square fills with people who talk about the weather, the harvest and the news from the capital, and the old "
    "men play cards under the lamps until the bell of the church tells everyone that it is time to go home."
)
HELD_OUT_TEXT = (
    "A library is a quiet place where anyone may sit and read. The shelves hold books about history, science, "
    "cooking and travel, and the librarian helps visitors find what they need. Students come after school to do "
    "their homework, and retired teachers come in the morning to read the newspapers. Once a month there is a talk "
    "by a local writer, and the room is full of chairs and questions. Most people leave with more books than they "
    "can finish, and they return them late, with apologies and stories about where they took them."
)


@pytest.mark.real_model
def test_activation_pruning_of_smollm2_beats_random_units_and_round_trips(smollm2_gguf, tmp_path):
    from lmforge.checkpoint.load import load

    model, tok = load(smollm2_gguf, dtype=torch.float32)  # pruning rewrites the weights
    calib = torch.tensor([tok.encode(CALIBRATION_TEXT, add_special_tokens=False)])
    held_out = torch.tensor([tok.encode(HELD_OUT_TEXT, add_special_tokens=False)])

    @torch.no_grad()
    def loss(m) -> float:
        logits = m(held_out)[0, :-1]
        return float(F.cross_entropy(logits, held_out[0, 1:]))

    base = loss(model)
    rand = torch.Generator().manual_seed(0)
    random_model = remove_neurons(copy.deepcopy(model), [sorted(torch.randperm(1536, generator=rand)[:384].tolist())
                                                         for _ in range(model.config.n_layer)])
    pruned, report = prune_structured(model, StructuredConfig(neurons=384), calibration=calib)
    assert report.params_after < report.params_before - 19_000_000  # 30 layers x 384 x 3 x 576 removed
    pruned_loss = loss(pruned)
    assert pruned_loss < loss(random_model) and pruned_loss < base + 1.0, (base, pruned_loss)
    save_hf(pruned, tmp_path / "smol-pruned")
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "smol-pruned")(held_out[:, :16]), pruned(held_out[:, :16]))
