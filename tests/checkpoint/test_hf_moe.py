"""Mixtral and Qwen2-MoE checkpoints: logits and router losses of models loaded by the production
loader equal transformers' on the same weights; both expert layouts load; lmforge's export loads
in transformers; damaged expert sets fail with the tensor named."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func  # noqa: E402

from lmforge.checkpoint.errors import CheckpointError  # noqa: E402
from lmforge.checkpoint.hf import save_hf  # noqa: E402
from lmforge.checkpoint.load import load_model  # noqa: E402
from lmforge.config import Config  # noqa: E402
from lmforge.model.moe import MoE, load_balancing_loss, take_router_logits  # noqa: E402
from lmforge.model.transformer import build_model  # noqa: E402

SHAPE = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
             max_position_embeddings=64)


def _randomize(model):
    """Weights large enough that routing is decided by clear margins (the router starts at zero in Qwen2-MoE)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.05 if "norm" in name else 0.15)
    return model.eval()


def _mixtral(**kw):
    args = dict(SHAPE, intermediate_size=48, num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2)
    cfg = transformers.MixtralConfig(**{**args, **kw})
    return _randomize(transformers.MixtralForCausalLM(cfg))


def _qwen(**kw):
    args = dict(SHAPE, intermediate_size=40, moe_intermediate_size=24, shared_expert_intermediate_size=36,
                num_hidden_layers=3, num_experts=6, num_experts_per_tok=2, norm_topk_prob=False)
    cfg = transformers.Qwen2MoeConfig(**{**args, **kw})
    return _randomize(transformers.Qwen2MoeForCausalLM(cfg))


BUILDERS = {
    "mixtral": _mixtral,
    "mixtral-top1": lambda: _mixtral(num_experts_per_tok=1),
    "qwen2-moe": _qwen,
    "qwen2-moe-normalised-dense-layer": lambda: _qwen(norm_topk_prob=True, mlp_only_layers=[1]),
    "qwen2-moe-every-2nd-layer": lambda: _qwen(decoder_sparse_step=2),
}


@pytest.fixture(params=sorted(BUILDERS))
def hf_dir(request, tmp_path):
    model = BUILDERS[request.param]()
    model.save_pretrained(tmp_path)
    return model, tmp_path


def _ids():
    return torch.randint(0, SHAPE["vocab_size"], (2, 11))


def test_logits_equal_transformers(hf_dir):
    ref, path = hf_dir
    ours = load_model(path)
    ids = _ids()
    with torch.no_grad():
        want = ref(ids).logits
        got = ours(ids)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    sparse = [i for i, layer in enumerate(ours.model.layers) if isinstance(layer.mlp, MoE)]
    assert sparse == [i for i, layer in enumerate(ref.model.layers) if "Sparse" in type(layer.mlp).__name__]


def test_router_logits_and_balancing_loss_equal_transformers(hf_dir):
    ref, path = hf_dir
    ours = load_model(path)
    ids = _ids()
    with torch.no_grad():
        out = ref(ids, output_router_logits=True, labels=ids)
        ours(ids)
    got = take_router_logits(ours)
    assert len(got) == len(out.router_logits)
    for a, b in zip(got, out.router_logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    config = ours.config
    torch.testing.assert_close(load_balancing_loss(got, config.n_experts, config.n_experts_per_tok), out.aux_loss,
                               atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.aux_loss, load_balancing_loss_func(out.router_logits, config.n_experts,
                                                                      config.n_experts_per_tok))


def test_config_reads_the_moe_fields(tmp_path):
    _qwen(decoder_sparse_step=1, mlp_only_layers=[2], router_aux_loss_coef=0.02).save_pretrained(tmp_path)
    config = load_model(tmp_path).config
    assert (config.n_experts, config.n_experts_per_tok, config.moe_intermediate_size) == (6, 2, 24)
    assert (config.shared_expert_intermediate_size, config.norm_topk_prob, config.qkv_bias) == (36, False, True)
    assert (config.dense_layers, config.router_aux_loss_coef, config.bias, config.sliding_window) == ([2], 0.02,
                                                                                                    False, None)


def test_stacked_expert_layout_loads_too(tmp_path):
    """transformers 5 keeps experts stacked in memory (gate_up_proj, down_proj); a file written from
    its state_dict has that layout instead of the hub's per-expert one."""
    ref = _mixtral()
    ref.save_pretrained(tmp_path)
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in state
    (tmp_path / "model.safetensors").unlink()
    save_file(state, str(tmp_path / "model.safetensors"))
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path)(ids), ref(ids).logits, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("preset", ["tiny-mixtral", "tiny-qwen-moe"])
def test_export_loads_in_transformers(preset, tmp_path):
    model = build_model(Config.from_name(preset, n_layer=2))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(5)  # decided routing
    save_hf(model, tmp_path)
    keys = load_file(tmp_path / "model.safetensors").keys()
    expert = "block_sparse_moe.experts.3.w2" if preset == "tiny-mixtral" else "mlp.experts.7.down_proj"
    assert f"model.layers.1.{expert}.weight" in keys  # the hub's per-expert layout
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids), ref(ids).logits, atol=1e-4, rtol=1e-4)


def test_export_refuses_what_transformers_cannot_run(tmp_path):
    with pytest.raises(ValueError, match="never drops tokens"):
        save_hf(build_model(Config.from_name("tiny-mixtral", capacity_factor=1.25)), tmp_path)
    with pytest.raises(ValueError, match="no shared expert"):
        save_hf(build_model(Config.from_name("tiny-mixtral", norm_topk_prob=False)), tmp_path)


def _damage(path, drop: str | None = None, rename: tuple[str, str] | None = None):
    state = load_file(path / "model.safetensors")
    if drop:
        del state[drop]
    if rename:
        state[rename[1]] = state.pop(rename[0])
    save_file(state, str(path / "model.safetensors"))


def test_missing_and_unexpected_expert_tensors_are_named(tmp_path):
    _mixtral().save_pretrained(tmp_path)
    _damage(tmp_path, drop="model.layers.1.block_sparse_moe.experts.2.w3.weight")
    with pytest.raises(CheckpointError, match=r"expert tensors missing: \['model.layers.1.mlp.experts.2.up'\]"):
        load_model(tmp_path)
    _mixtral().save_pretrained(tmp_path)
    _damage(tmp_path, rename=("model.layers.0.block_sparse_moe.experts.3.w1.weight",
                              "model.layers.0.block_sparse_moe.experts.4.w1.weight"))
    with pytest.raises(CheckpointError, match=r"experts.4.w1.weight.*the config has 4 experts"):
        load_model(tmp_path)


def test_config_without_expert_count_is_a_clear_error(tmp_path):
    _mixtral().save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    del cfg["num_local_experts"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="lacks the key 'num_local_experts'"):
        load_model(tmp_path)
