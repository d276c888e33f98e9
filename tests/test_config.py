"""Config: presets are valid, derive their fields and round-trip through JSON."""

from __future__ import annotations

import json

import pytest

from lmforge.config import PRESETS, Config
from lmforge.model.transformer import build_model


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip_through_json(name, tmp_path):
    config = Config.from_name(name)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config.to_dict()))
    assert Config.from_file(path) == config


def test_gemma3_layer_pattern_and_scale():
    config = Config.from_name("gemma3-270m")
    assert config.layer_types == (["sliding"] * 5 + ["global"]) * 3
    assert config.attn_scale == 256 ** -0.5


def test_smollm2_parameter_count():
    model = build_model(Config.from_name("smollm2-135m"), device="meta")
    assert sum(p.numel() for p in model.parameters()) == 134_515_008  # published: 135M, tied embeddings


@pytest.mark.parametrize("bad,match", [
    (dict(n_head=4, n_kv_head=3), "multiple of n_kv_head"),
    (dict(n_embd=65, n_head=4), "not divisible"),
    (dict(norm="batchnorm"), "norm='batchnorm' is not one of"),
])
def test_invalid_configs_say_why(bad, match):
    with pytest.raises(ValueError, match=match):
        Config(**bad)


def test_unknown_preset_and_fields_are_named():
    with pytest.raises(ValueError, match="unknown preset 'gpt5'"):
        Config.from_name("gpt5")
    with pytest.raises(ValueError, match=r"unknown config fields \['n_embed'\]"):
        Config.from_dict({"n_embed": 64})
