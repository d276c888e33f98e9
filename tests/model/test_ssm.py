"""Mamba's selective scan and models: the parallel scan equals a token-by-token loop (values and
gradients), the recurrent step equals the parallel forward, padding and packing leave the state
right, hybrids decode as they run in one forward, training steps reduce the loss, bad states fail."""

from __future__ import annotations

import pytest
import torch

from lmforge.config import Config
from lmforge.generation.fused_decode import decode_step, supported_architecture
from lmforge.generation.generate import generate_ids
from lmforge.generation.kv_cache import KVCache
from lmforge.generation.sampling import SamplingParams
from lmforge.generation.state_cache import RecurrentCache, make_cache
from lmforge.model import ssm
from lmforge.model.mamba import MambaLM, build_mamba
from lmforge.model.ssm import MambaMixer, SSMState, selective_scan
from lmforge.model.transformer import Transformer, build_model
from lmforge.training.objectives import hidden_states, pretrain_loss

PRESETS = ["tiny-mamba", "tiny-hybrid"]


def reference_scan(u, delta, A, B, C, h0=None, resets=None):
    """The recurrence as written in the paper, one token at a time in float64, independent of ssm.py."""
    batch, T, D = u.shape
    h = torch.zeros(batch, D, A.shape[1], dtype=torch.float64) if h0 is None else h0.double()
    ys = []
    for t in range(T):
        if resets is not None:
            h = h * (~resets[:, t]).double()[:, None, None]
        decay = torch.exp(delta[:, t, :, None].double() * A.double())  # (batch, D, N)
        h = decay * h + delta[:, t, :, None].double() * B[:, t, None, :].double() * u[:, t, :, None].double()
        ys.append(torch.einsum("bdn,bn->bd", h, C[:, t].double()))
    return torch.stack(ys, dim=1), h


def scan_inputs(batch=2, T=100, D=6, N=5, grad=False):
    u, B, C = torch.randn(batch, T, D), torch.randn(batch, T, N), torch.randn(batch, T, N)
    delta = torch.nn.functional.softplus(torch.randn(batch, T, D) - 1)
    A = -torch.exp(torch.randn(D, N))
    h0 = torch.randn(batch, D, N)
    return [t.requires_grad_(grad) for t in (u, delta, A, B, C, h0)]


def mamba(name: str, std: float = 0.2) -> MambaLM:
    """A random model with weights large enough that tokens change the logits visibly."""
    model = build_mamba(Config.from_name(name)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2 and p is not model.backbone.embeddings.weight:
                p.mul_(std / 0.02 if p.std() < 0.05 else 1.0)
    return model


@pytest.mark.parametrize("T", [1, 31, 32, 100])
@pytest.mark.parametrize("with_h0", [False, True])
def test_scan_equals_sequential_loop(T, with_h0):
    u, delta, A, B, C, h0 = scan_inputs(T=T)
    y, h = selective_scan(u, delta, A, B, C, h0 if with_h0 else None)
    y_ref, h_ref = reference_scan(u, delta, A, B, C, h0 if with_h0 else None)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(h.double(), h_ref, rtol=1e-4, atol=1e-5)


def test_scan_carries_state_across_segments_and_resets(monkeypatch):
    monkeypatch.setattr(ssm, "SEGMENT", 40)  # 3 segments of 40, 40, 20 tokens
    u, delta, A, B, C, h0 = scan_inputs(T=100)
    resets = torch.zeros(2, 100, dtype=torch.bool)
    resets[0, 17], resets[1, 40], resets[1, 77] = True, True, True  # one on a segment edge
    y, h = selective_scan(u, delta, A, B, C, h0, resets)
    y_ref, h_ref = reference_scan(u, delta, A, B, C, h0, resets)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(h.double(), h_ref, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(y, ssm.sequential_scan(u, delta, A, B, C, h0)[0])  # the resets mattered


@pytest.mark.parametrize("with_resets", [False, True])
def test_scan_gradients_equal_loop(with_resets):
    inputs = scan_inputs(T=70, grad=True)
    weight = torch.randn(2, 70, 6)
    resets = torch.zeros(2, 70, dtype=torch.bool)
    if with_resets:
        resets[0, 9], resets[1, 33] = True, True
    y, h = selective_scan(*inputs, resets=resets)
    grads = torch.autograd.grad((y * weight).sum() + h.sum(), inputs)
    y_ref, h_ref = reference_scan(*inputs, resets=resets)
    grads_ref = torch.autograd.grad((y_ref * weight.double()).sum() + h_ref.sum(), inputs)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g.double(), g_ref.double(), rtol=1e-3, atol=1e-4)


def test_sequential_scan_equals_parallel():
    u, delta, A, B, C, h0 = scan_inputs(T=50)
    y, h = ssm.sequential_scan(u, delta, A, B, C, h0)
    y_par, h_par = selective_scan(u, delta, A, B, C, h0)
    torch.testing.assert_close(y, y_par, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(h, h_par, rtol=1e-4, atol=1e-5)


def test_recurrent_step_equals_parallel_forward_token_by_token():
    config = Config.from_name("tiny-mamba")
    mixer = mamba("tiny-mamba").backbone.layers[0].mixer
    x = torch.randn(2, 24, config.n_embd)
    with torch.no_grad():
        full = mixer(x)
        state = SSMState.zeros(config, 2)
        steps = torch.cat([mixer.step(x[:, t:t + 1], state) for t in range(24)], dim=1)
        state_par = SSMState.zeros(config, 2)
        mixer(x, state_par)
    torch.testing.assert_close(steps, full, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(state.ssm, state_par.ssm, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(state.conv, state_par.conv)


@pytest.mark.parametrize("name", PRESETS)
def test_prefill_then_decode_equals_full_forward(name):
    model = mamba(name)
    ids = torch.randint(0, 256, (2, 40))
    with torch.no_grad():
        full = model(ids)
        cache = make_cache(model.config, 2, 40)
        parts = [model(ids[:, :17], cache=cache), model(ids[:, 17:25], cache=cache)]
        parts += [model(ids[:, t:t + 1], cache=cache) for t in range(25, 40)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-4, atol=1e-4)
    assert cache.length == 40


@pytest.mark.parametrize("name", PRESETS)
def test_left_padded_batch_equals_unpadded(name):
    model = mamba(name)
    prompts = [[5, 17, 99, 3, 250, 1, 7, 8, 9, 10, 11], [42, 43], [7, 7, 7, 1, 2]]
    params = SamplingParams(max_new_tokens=12, temperature=0)
    batched = generate_ids(model, prompts, params)
    alone = [generate_ids(model, [p], params)[0] for p in prompts]
    assert batched == alone
    with torch.no_grad():  # the logits too, not only their argmax
        ids = torch.tensor([[0] * 9 + prompts[1]])
        valid = torch.tensor([[False] * 9 + [True, True]])
        positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
        padded = model(ids, cache=make_cache(model.config, 1, 11), positions=positions, valid=valid)[:, -1]
        plain = model(torch.tensor([prompts[1]]))[:, -1]
    torch.testing.assert_close(padded, plain, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", PRESETS)
def test_packed_rows_equal_separate_examples(name):
    model = mamba(name)
    a, b = torch.randint(0, 256, (1, 9)), torch.randint(0, 256, (1, 14))
    packed = {"input_ids": torch.cat([a, b], 1), "seq_ids": torch.tensor([[0] * 9 + [1] * 14]),
              "positions": torch.cat([torch.arange(9), torch.arange(14)])[None]}
    with torch.no_grad():
        got = hidden_states(model, packed)
        want = [hidden_states(model, {"input_ids": x, "positions": torch.arange(x.shape[1])[None]}) for x in (a, b)]
    torch.testing.assert_close(got, torch.cat(want, dim=1), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", PRESETS)
def test_pretraining_steps_reduce_the_loss(name):
    model = build_mamba(Config.from_name(name)).train()
    ids = torch.randint(0, 256, (4, 48))
    batch = {"input_ids": ids, "positions": torch.arange(48).expand(4, 48)}
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = pretrain_loss(model, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(p.grad is not None for p in model.parameters())
    assert losses[-1] < losses[0] - 0.1


def test_gradient_checkpointing_keeps_the_gradients():
    model = build_mamba(Config.from_name("tiny-hybrid")).train()
    batch = {"input_ids": torch.randint(0, 256, (2, 30)), "positions": torch.arange(30).expand(2, 30)}
    grads = []
    for ckpt in (False, True):
        model.gradient_checkpointing = ckpt
        model.zero_grad()
        pretrain_loss(model, batch).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for g, g_ckpt in zip(*grads):
        torch.testing.assert_close(g, g_ckpt)


def test_beam_search_runs_on_the_recurrent_state():
    from lmforge.generation.beam import beam_search

    model = mamba("tiny-hybrid")
    prompt = [3, 1, 4, 1, 5]
    params = SamplingParams(max_new_tokens=6, temperature=0, num_beams=3)
    best = beam_search(model, prompt, params, set())[0]
    with torch.no_grad():  # its score is the sequence's log-probability under one full forward
        logp = model(torch.tensor([prompt + best.tokens])).log_softmax(-1)[0]
    expected = sum(float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(best.tokens)) / len(best.tokens)
    assert best.score == pytest.approx(expected, abs=1e-4)


def test_fused_decode_does_not_take_mamba_models():
    for name in PRESETS:
        config = Config.from_name(name)
        assert not supported_architecture(config)
        assert decode_step(mamba(name), torch.tensor([1]), make_cache(config, 1, 4)) is None
    assert supported_architecture(Config.from_name("tiny-llama"))


def test_cache_memory_is_constant_for_mamba_and_grows_for_attention():
    mamba_config, hybrid = Config.from_name("tiny-mamba"), Config.from_name("tiny-hybrid")
    assert RecurrentCache(mamba_config, 1, 1000).nbytes() == RecurrentCache(mamba_config, 1, 100_000).nbytes()
    assert RecurrentCache(hybrid, 1, 2000).nbytes() > RecurrentCache(hybrid, 1, 1000).nbytes()
    kv = RecurrentCache(hybrid, 1, 10).kv
    assert [k is not None for k in kv.k] == [m == "attention" for m in hybrid.mixers]


def test_state_of_another_model_is_refused():
    model = mamba("tiny-mamba")
    other = Config.from_name("tiny-mamba", n_embd=32)
    cache = make_cache(model.config, 1, 8)
    cache.ssm[1] = SSMState.zeros(other, 1)
    with pytest.raises(ValueError, match=r"SSM state has shapes .*another model or batch"):
        model(torch.tensor([[1, 2]]), cache=cache)
    with pytest.raises(ValueError, match="built for another model"):
        model(torch.tensor([[1]]), cache=make_cache(Config.from_name("tiny-hybrid"), 1, 8))
    with pytest.raises(ValueError, match="another model or batch"):
        model(torch.tensor([[1], [2]]), cache=make_cache(model.config, 1, 8))  # batch 2 on a batch-1 state
    with pytest.raises(TypeError, match="not a KVCache"):
        model(torch.tensor([[1]]), cache=KVCache(Config.from_name("tiny-llama"), 1, 8))
    with pytest.raises(ValueError, match="cannot be rolled back"):
        make_cache(model.config, 1, 8).truncate(0)


def test_models_refuse_the_other_family_config():
    with pytest.raises(ValueError, match="arch='transformer'"):
        MambaLM(Config.from_name("tiny-llama"))
    with pytest.raises(ValueError, match="arch='mamba'"):
        Transformer(Config.from_name("tiny-mamba"))
    assert isinstance(build_model(Config.from_name("tiny-mamba")), MambaLM)


@pytest.mark.parametrize("overrides,message", [
    (dict(n_experts=4), "n_experts=4 with arch='mamba'"),
    (dict(sliding_window=16), "sliding_window=16 with arch='mamba'"),
    (dict(d_state=0), "d_state=0 must be >= 1"),
    (dict(attn_layer_period=4, attn_layer_offset=4), "attn_layer_offset=4 must be in"),
    (dict(mixers=["mamba", "conv"]), "each one of"),
    (dict(arch="rnn"), "arch='rnn' is not one of"),
    (dict(attn_layer_period=2, position="alibi"), "attention layers of a hybrid use RoPE"),
])
def test_config_refuses_what_mamba_cannot_build(overrides, message):
    with pytest.raises(ValueError, match=message):
        Config.from_name("tiny-mamba", **overrides)


def test_config_derives_mixers_and_rank():
    hybrid = Config.from_name("tiny-hybrid")
    assert hybrid.mixers == ["mamba", "mamba", "attention", "mamba"]
    assert Config.from_name("mamba-130m").dt_rank == 48  # ceil(768 / 16), as state-spaces/mamba-130m
    assert Config.from_dict(hybrid.to_dict()) == hybrid
    with pytest.raises(ValueError, match="set arch='mamba'"):
        Config.from_name("tiny-llama", mixers=["mamba", "attention"])
    assert isinstance(MambaMixer(hybrid, 0).A_log, torch.nn.Parameter)


def test_text_generation_and_streaming_run_on_the_state():
    from lmforge.generation.generate import generate, stream
    from tests.training.conftest import VOCAB, byte_tokenizer

    tokenizer = byte_tokenizer()
    model = build_mamba(Config.from_name("tiny-hybrid", vocab_size=VOCAB)).eval()
    params = SamplingParams(max_new_tokens=10, temperature=0)
    prompts = ["The state of the", "A"]
    batched = generate(model, tokenizer, prompts, params)
    alone = [generate(model, tokenizer, p, params)[0] for p in prompts]
    assert [c.token_ids for c in batched] == [c.token_ids for c in alone]
    assert all(len(c.token_ids) == 10 for c in batched)
    assert "".join(stream(model, tokenizer, prompts[0], params)) == batched[0].text


def test_serving_engine_refuses_a_mamba_model():
    from lmforge.serving.engine import Engine
    from tests.training.conftest import byte_tokenizer

    with pytest.raises(ValueError, match="pages a KV cache.*recurrent state"):
        Engine(mamba("tiny-mamba"), byte_tokenizer())
