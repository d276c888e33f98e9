"""Mixture of Experts: routing, grouped compute, capacity, auxiliary losses, gradients, generation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmforge.config import Config
from lmforge.generation.fused_decode import supported_architecture
from lmforge.generation.generate import generate_ids
from lmforge.generation.sampling import SamplingParams
from lmforge.model.moe import (MoE, dispatch, expert_capacity, expert_usage, load_balancing_loss, moe_layers,
                               reset_usage, route, router_z_loss, take_router_logits)
from lmforge.model.transformer import build_model
from lmforge.training.objectives import pretrain_loss

E, H, I, K = 6, 16, 24, 2


def _layer(**kw) -> MoE:
    config = Config(n_embd=H, n_head=2, intermediate_size=I, n_experts=E, n_experts_per_tok=K, **kw)
    layer = MoE(config)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.3)
    return layer


def _expert_ref(layer: MoE, e: int, v: torch.Tensor) -> torch.Tensor:
    """Expert e on one token (H,), from its stacked weights: down(silu(gate v) * (up v))."""
    wg, wu = layer.experts.gate_up_proj[e][:I], layer.experts.gate_up_proj[e][I:]
    return layer.experts.down_proj[e] @ (F.silu(wg @ v) * (wu @ v))


def _per_token_ref(layer: MoE, x: torch.Tensor, keep=None) -> torch.Tensor:
    """Token by token, pick by pick: the weighted sum of the chosen experts (the naive MoE)."""
    probs = torch.softmax(x @ layer.gate.weight.t(), dim=-1)
    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        top = sorted(range(E), key=lambda e: -float(probs[n, e]))[:K]
        total = sum(float(probs[n, e]) for e in top) if layer.normalize else 1.0
        for j, e in enumerate(top):
            if keep is None or (n, j) in keep:
                out[n] += probs[n, e] / total * _expert_ref(layer, e, x[n])
    if layer.shared_expert is not None:
        s = layer.shared_expert
        shared = s.down_proj(F.silu(s.gate_proj(x)) * s.up_proj(x))
        out = out + torch.sigmoid(x @ layer.shared_expert_gate.weight.t()) * shared
    return out


@pytest.mark.parametrize("kw", [dict(norm_topk_prob=True), dict(norm_topk_prob=False),
                                dict(norm_topk_prob=False, shared_expert_intermediate_size=20)],
                         ids=["mixtral", "qwen", "qwen-shared"])
def test_grouped_compute_equals_per_token_reference(kw):
    layer = _layer(**kw)
    x = torch.randn(3, 7, H)
    with torch.no_grad():
        got = layer(x).reshape(-1, H)
        want = _per_token_ref(layer, x.reshape(-1, H))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_route_renormalises_only_when_asked():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    probs = torch.tensor([2.0, 1.0, 0.0, -1.0]).exp() / torch.tensor([2.0, 1.0, 0.0, -1.0]).exp().sum()
    w, e = route(logits, 2, normalize=False)
    assert e.tolist() == [[0, 1]]
    torch.testing.assert_close(w[0], probs[:2])
    w, _ = route(logits, 2, normalize=True)
    torch.testing.assert_close(w[0], probs[:2] / probs[:2].sum())


def test_capacity_keeps_first_picks_then_earlier_tokens():
    # 4 tokens, top-2 of 3 experts, room for 2 assignments per expert. First picks go first in token
    # order: 0->e0, 1->e0, 2->e0 (full: dropped), 3->e1; then second picks: 0->e1, 1->e2, 2->e1 (full), 3->e0 (full)
    picks = torch.tensor([[0, 1], [0, 2], [0, 1], [1, 0]])
    plan = dispatch(picks, 3, capacity=2)
    kept = sorted(zip(plan.token.tolist(), plan.choice.tolist()))
    assert kept == [(0, 0), (0, 1), (1, 0), (1, 1), (3, 0)]
    assert plan.counts == [2, 2, 1] and plan.routed.tolist() == [4, 3, 1]
    assert expert_capacity(n_tokens=4, k=2, n_experts=3, factor=0.75) == 2  # ceil(0.75 * 8 / 3)


def test_capacity_drops_those_assignments_from_the_output():
    layer = _layer(capacity_factor=0.5)
    x = torch.randn(12, H)
    with torch.no_grad():
        _, picks = route(x @ layer.gate.weight.t(), K, True)
        cap = expert_capacity(12, K, E, 0.5)
        plan = dispatch(picks, E, cap)
        keep = set(zip(plan.token.tolist(), plan.choice.tolist()))
        # the independent rule: choice-major, token order, an expert full after `cap`
        taken, expected = [0] * E, set()
        for j in range(K):
            for n in range(12):
                e = int(picks[n, j])
                if taken[e] < cap:
                    taken[e] += 1
                    expected.add((n, j))
        assert keep == expected and len(keep) < 12 * K
        torch.testing.assert_close(layer(x), _per_token_ref(layer, x, keep), atol=1e-5, rtol=1e-5)
    assert layer.dropped == 12 * K - len(keep)


def test_load_balancing_loss_equals_transformers():
    mixtral = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
    logits = tuple(torch.randn(10, E) * 2 for _ in range(3))  # 3 layers, batch 2 x 5 tokens
    want = mixtral.load_balancing_loss_func(logits, E, K)
    torch.testing.assert_close(load_balancing_loss(list(logits), E, K), want)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    want = mixtral.load_balancing_loss_func(logits, E, K, attention_mask=mask)
    torch.testing.assert_close(load_balancing_loss(list(logits), E, K, valid=mask.bool()), want)


def test_load_balancing_loss_is_top_k_when_balanced_and_grows_with_collapse():
    balanced = torch.eye(E).repeat(4, 1) * 50  # each expert certain for 4 tokens: f_e = P_e = 1/E
    torch.testing.assert_close(load_balancing_loss(balanced, E, 1), torch.tensor(1.0))
    collapsed = torch.zeros(24, E)
    collapsed[:, 0] = 50.0  # every token to expert 0 with probability ~1
    torch.testing.assert_close(load_balancing_loss(collapsed, E, 1), torch.tensor(float(E)))


def test_router_z_loss_is_mean_squared_log_partition():
    logits = torch.randn(2, 8, E)
    want = torch.stack([torch.log(torch.exp(row).sum()) ** 2 for row in logits.reshape(-1, E)]).mean()
    torch.testing.assert_close(router_z_loss([logits[0], logits[1]]), want)


def test_gradients_reach_exactly_the_experts_that_received_tokens():
    layer = _layer()
    with torch.no_grad():
        layer.gate.weight.abs_()
        layer.gate.weight[4:] = -1.0  # x >= 0 below, so experts 4 and 5 never win
    x = torch.randn(20, H).abs().requires_grad_()
    layer(x).square().sum().backward()
    routed = layer.tokens_per_expert.tolist()
    assert routed[4:] == [0, 0] and all(n > 0 for n in routed[:4])
    for e in range(E):
        reached = [bool(p.grad[e].abs().sum() > 0) for p in (layer.experts.gate_up_proj, layer.experts.down_proj)]
        assert reached == [routed[e] > 0] * 2, (e, routed)
    assert layer.gate.weight.grad[:4].abs().sum() > 0 and x.grad.abs().sum() > 0


def _batch(B=2, T=12, vocab=256):
    ids = torch.randint(0, vocab, (B, T))
    return {"input_ids": ids, "positions": torch.arange(T).expand(B, T), "labels": ids}


def test_objective_adds_coef_times_losses_of_the_recorded_router_logits():
    model = build_model(Config.from_name("tiny-mixtral", router_aux_loss_coef=0.1, router_z_loss_coef=0.01))
    model.train()
    batch = _batch()
    total = pretrain_loss(model, batch)
    assert all(m.router_logits is None for m in moe_layers(model))  # taken by the objective
    with torch.no_grad():
        model(batch["input_ids"])  # the same routing, read from the layers
        router = take_router_logits(model)
        model.config.router_aux_loss_coef = model.config.router_z_loss_coef = 0.0
        plain = pretrain_loss(model, batch)
    assert len(router) == 2 and router[0].shape == (24, 4)
    mixtral = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
    aux = mixtral.load_balancing_loss_func(tuple(router), 4, 2)
    z = torch.logsumexp(torch.cat(router), dim=-1).square().mean()
    torch.testing.assert_close(total.detach(), plain + 0.1 * aux + 0.01 * z)
    model.eval()  # held-out losses are plain next-token losses
    with torch.no_grad():
        model.config.router_aux_loss_coef = 0.1
        torch.testing.assert_close(pretrain_loss(model, batch), plain)


def test_gradient_checkpointing_counts_once_and_keeps_gradients():
    grads, counts = [], []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = build_model(Config.from_name("tiny-qwen-moe", router_z_loss_coef=0.01))
        model.train()
        model.gradient_checkpointing = ckpt
        pretrain_loss(model, _batch()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        counts.append([m.tokens_per_expert.sum().item() for m in moe_layers(model)])
    assert counts == [[2 * 12 * 2] * 2] * 2  # B * T * top-k per layer, not doubled by the recompute
    assert grads[0].keys() == grads[1].keys() and "model.layers.0.mlp.gate.weight" in grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5)


def test_expert_usage_is_the_share_of_routed_assignments():
    model = build_model(Config.from_name("tiny-mixtral"))
    with torch.no_grad():
        model(torch.randint(0, 256, (2, 9)))
    router = take_router_logits(model)
    usage = expert_usage(model)
    for layer, logits in zip(("0", "1"), router):
        counts = torch.bincount(logits.topk(2, dim=-1).indices.flatten(), minlength=4).double()
        assert usage[layer] == pytest.approx((counts / counts.sum()).tolist())
    reset_usage(model)
    assert expert_usage(model) == {}


def test_generation_runs_the_pytorch_forward_and_matches_full_recompute():
    model = build_model(Config.from_name("tiny-qwen-moe", n_experts_per_tok=3)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(10)  # confident, varied routing so every step picks its own experts
    assert not supported_architecture(model.config) and supported_architecture(Config.from_name("tiny-llama"))
    prompts = [[5, 17, 99, 3], [8, 1]]  # a batch with left padding
    got = generate_ids(model, prompts, SamplingParams(max_new_tokens=8, temperature=0.0))
    for prompt, out in zip(prompts, got):
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(8):  # no cache, no padding: the whole sequence each step
                ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
        assert out == ids[len(prompt):]


def test_moe_step_and_dense_layers_pick_the_sparse_layers():
    config = Config.from_name("tiny-qwen-moe", n_layer=6, moe_step=2, dense_layers=[3])
    model = build_model(config, device="meta")
    sparse = [i for i, layer in enumerate(model.model.layers) if isinstance(layer.mlp, MoE)]
    assert sparse == [1, 5]  # every 2nd layer (1-based), layer 3 kept dense


@pytest.mark.parametrize("name,total,active", [("mixtral-8x7b", 46.7e9, 12.9e9),
                                               ("qwen1.5-moe-a2.7b", 14.3e9, 2.7e9)])
def test_real_shapes_have_their_published_sizes(name, total, active):
    model = build_model(Config.from_name(name), device="meta")
    count = sum(p.numel() for p in model.parameters())
    idle = sum((m.experts.gate_up_proj.numel() + m.experts.down_proj.numel()) // m.n_experts
               * (m.n_experts - m.top_k) for m in moe_layers(model))
    # the published figures are rounded to 0.1B
    assert count == pytest.approx(total, abs=0.05e9) and count - idle == pytest.approx(active, abs=0.05e9)


@pytest.mark.parametrize("bad,match", [
    (dict(n_experts=4, n_experts_per_tok=5), "n_experts_per_tok=5 must be between 1 and n_experts=4"),
    (dict(n_experts=4, n_experts_per_tok=0), "n_experts_per_tok=0 must be between 1"),
    (dict(n_experts=-1), "n_experts=-1 must be >= 0"),
    (dict(n_experts=4, capacity_factor=0.0), "capacity_factor=0.0 must be > 0"),
    (dict(n_experts=4, mlp="gelu"), "experts are SwiGLU"),
    (dict(n_experts=4, router_aux_loss_coef=-0.1), "router_aux_loss_coef=-0.1 must be >= 0"),
    (dict(n_experts=4, moe_step=0), "moe_step=0 must be >= 1"),
    (dict(n_experts=4, dense_layers=[2]), r"dense_layers \[2\] are not layers of a 2-layer model"),
])
def test_bad_moe_configs_say_why(bad, match):
    with pytest.raises(ValueError, match=match):
        Config(**bad)
