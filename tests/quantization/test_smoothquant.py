"""SmoothQuant: exact folding on tiny LLaMA / Gemma 3 / GPT-2 models, the scale formula, and lower int8 error."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lmforge.config import Config
from lmforge.model.transformer import build_model, column_major_linears
from lmforge.quantization.quantize import QuantConfig, needs_calibration, quantize_model
from lmforge.quantization.smoothquant import activation_max, smooth_groups, smooth_model, smooth_scales

OUTLIERS = [3, 17]  # channels made 50x larger, like the few huge channels of real LLM activations


def _scale_norm(norm: nn.Module, factor: float) -> None:
    if getattr(norm, "unit_offset", False):  # Gemma: y = x_hat * (1 + w)
        norm.weight[OUTLIERS] = (1.0 + norm.weight[OUTLIERS]) * factor - 1.0
    else:
        norm.weight[OUTLIERS] *= factor
        if getattr(norm, "bias", None) is not None:
            norm.bias[OUTLIERS] *= factor


@torch.no_grad()
def outlier_model(name: str, factor: float = 50.0) -> nn.Module:
    """A tiny random model (column-major linears) whose linear inputs have `factor`x outlier channels.

    Each producer (the norms, up_proj's and v_proj's rows) is scaled up on OUTLIERS and the consumers'
    columns scaled down, so the activations carry outliers while the weights stay ordinary, as measured
    in LLMs (SmoothQuant fig. 4); the model computes what the plain random model does.
    """
    model = column_major_linears(build_model(Config.from_name(name)).eval())
    for block in model.model.layers:
        attn, mlp = block.self_attn, block.mlp
        mlp_norm = block.pre_feedforward_layernorm if block.sandwich else block.post_attention_layernorm
        consumers = [([block.input_layernorm], [attn.q_proj, attn.k_proj, attn.v_proj]),
                     ([mlp_norm], [mlp.up_proj] + ([mlp.gate_proj] if hasattr(mlp, "gate_proj") else [])),
                     ([attn.v_proj], [attn.o_proj])]
        if hasattr(mlp, "gate_proj"):
            consumers.append(([mlp.up_proj], [mlp.down_proj]))
        for producers, linears in consumers:
            for producer in producers:
                if isinstance(producer, nn.Linear):
                    producer.weight[OUTLIERS] *= factor
                else:
                    _scale_norm(producer, factor)
            columns = _o_proj_columns(model.config) if linears == [attn.o_proj] else OUTLIERS
            for linear in linears:
                linear.weight[:, columns] /= factor
    return model


def _o_proj_columns(config: Config) -> list[int]:
    """o_proj's input channels fed by v_proj rows OUTLIERS (kv head r // hd, dim r % hd; each query head of it)."""
    hd, group = config.head_dim, config.n_head // config.n_kv_head
    return [(r // hd * group + g) * hd + r % hd for r in OUTLIERS for g in range(group)]


def _data(n: int = 4) -> tuple[list[torch.Tensor], torch.Tensor]:
    return [torch.randint(0, 256, (1, 32)) for _ in range(n)], torch.randint(0, 256, (2, 24))


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma3", "tiny-gpt2"])
def test_smoothing_leaves_the_float_model_unchanged(name):
    model = outlier_model(name)
    calibration, ids = _data()
    smoothed = copy.deepcopy(model)
    scales = smooth_model(smoothed, calibration, alpha=0.5, include_lm_head=True)
    with torch.no_grad():
        torch.testing.assert_close(smoothed(ids), model(ids), rtol=1e-4, atol=1e-4)
    assert len(scales) == len(smooth_groups(model, include_lm_head=True))
    assert all((s - 1).abs().max() > 0.1 for s in scales.values())  # every group really was rescaled
    for (key, w), w0 in zip(smoothed.named_parameters(), model.parameters()):
        assert w.stride() == w0.stride(), key  # column-major weights stay column-major
    assert smoothed.lm_head.weight is not smoothed.model.embed_tokens.weight  # untied to smooth lm_head
    torch.testing.assert_close(smoothed.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_smoothing_flattens_the_activations_as_alpha_says():
    """alpha=1: s = max|X|, so every smoothed input channel peaks at 1 (per kv group for o_proj)."""
    model = outlier_model("tiny-llama")
    calibration, _ = _data()
    names = [g.linears[0] for g in smooth_groups(model)]
    before = activation_max(model, names, calibration)
    assert max(float(x.max() / x.median()) for x in before.values()) > 20  # the injected outliers
    smooth_model(model, calibration, alpha=1.0)
    after = activation_max(model, names, calibration)
    for name, x in after.items():
        if name.endswith("o_proj"):  # 4 query heads share 2 kv heads: s is the max over each pair
            x = x.view(2, 2, 16).amax(dim=1)
        torch.testing.assert_close(x, torch.ones_like(x), rtol=1e-4, atol=1e-4, msg=name)


def test_scales_match_a_hand_computation():
    act_max = torch.tensor([4.0, 1.0, 0.0])
    w1, w2 = torch.tensor([[2.0, 0.5, 1.0], [1.0, -0.25, 0.0]]), torch.tensor([[-3.0, 0.1, 0.5]])
    # max|W| per column over both linears: [3, 0.5, 1]; a dead channel (max|X| = 0) is floored at 1e-5
    torch.testing.assert_close(smooth_scales(act_max, [w1, w2], 0.5),
                               torch.tensor([(4 / 3) ** 0.5, (1 / 0.5) ** 0.5, 1e-5 ** 0.5]))
    torch.testing.assert_close(smooth_scales(act_max, [w1, w2], 0.0), torch.tensor([1 / 3, 2.0, 1.0]))
    torch.testing.assert_close(smooth_scales(act_max, [w1, w2], 1.0), torch.tensor([4.0, 1.0, 1e-5]))
    with pytest.raises(ValueError, match="alpha=1.5"):
        smooth_scales(act_max, [w1], 1.5)


def test_alpha_zero_normalises_the_weight_columns_of_a_layer():
    """alpha=0: s_j = 1 / max|W_j| over q, k and v, so afterwards every column of [q; k; v] peaks at 1."""
    model = outlier_model("tiny-llama")
    attn = model.model.layers[0].self_attn
    w = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).detach().clone()
    norm_weight = model.model.layers[0].input_layernorm.weight.detach().clone()
    scales = smooth_model(model, _data()[0], alpha=0.0)
    expected = 1.0 / w.abs().amax(dim=0)
    torch.testing.assert_close(scales["model.layers.0.self_attn.q_proj"], expected)
    torch.testing.assert_close(model.model.layers[0].input_layernorm.weight, norm_weight / expected)
    # v_proj's rows were also divided by o_proj's scales; q and k show the column normalisation alone
    qk = torch.cat([attn.q_proj.weight, attn.k_proj.weight]).abs().amax(dim=0)
    assert (qk <= 1 + 1e-6).all() and (qk > 0).all()


@pytest.mark.parametrize("method", ["int8-dynamic", "int8-static"])
def test_smoothing_lowers_the_int8_error_with_outliers(method):
    model = outlier_model("tiny-llama")
    calibration, ids = _data()
    with torch.no_grad():
        ref = model(ids)
    errors = {}
    for alpha in (None, 0.5):
        q = quantize_model(copy.deepcopy(model), QuantConfig(method, smooth_alpha=alpha), calibration, progress=False)
        with torch.no_grad():
            errors[alpha] = float((q(ids) - ref).norm() / ref.norm())
    assert errors[0.5] < 0.25 * errors[None], errors  # measured 0.207 -> 0.019, 0.304 -> 0.038


def test_config_and_calibration_rules():
    assert QuantConfig().smooth_alpha == 0.5
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="smooth_alpha"):
            QuantConfig("int8-dynamic", smooth_alpha=bad)
    assert needs_calibration(QuantConfig("int8-dynamic"))
    assert not needs_calibration(QuantConfig("int8-dynamic", smooth_alpha=None))
    assert needs_calibration(QuantConfig("int8-static", smooth_alpha=None))
    assert not needs_calibration(QuantConfig("int4"))  # smoothing is for int8 activations only
    model = build_model(Config.from_name("tiny-llama")).eval()
    with pytest.raises(ValueError, match="needs calibration data.*smooth_alpha=None"):
        quantize_model(model, QuantConfig("int8-dynamic"), progress=False)
    assert isinstance(model.lm_head, nn.Linear)  # nothing swapped
    quantize_model(model, QuantConfig("int8-dynamic", smooth_alpha=None), progress=False)  # no calibration needed
    with pytest.raises(ValueError, match="smooth the float model before quantizing"):
        smooth_model(model, _data()[0])
