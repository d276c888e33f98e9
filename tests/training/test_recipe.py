"""Packaged recipes are valid; overrides are typed; mistakes name the field."""

from __future__ import annotations

import pytest

from lmforge.training.recipe import RECIPE_DIR, load_recipe, recipe_names


def test_packaged_recipes_validate() -> None:
    assert {"dora", "lora", "qlora"} <= set(recipe_names())
    for name in recipe_names():  # every packaged recipe, whatever its objective, validates
        recipe = load_recipe(name)
        assert recipe.train.max_steps > 0 and recipe.lora.rank > 0
        from lmforge.training.finetune import RUNNERS
        assert recipe.objective in RUNNERS, f"{name}.yaml: objective {recipe.objective!r} has no runner"
        assert (RECIPE_DIR / f"{name}.yaml").read_text().startswith("#")  # each says what it is
    assert load_recipe("dora").lora.dora and load_recipe("qlora").lora.quantize == "nf4"
    assert not load_recipe("lora").lora.dora and load_recipe("lora").lora.quantize == "none"


def test_dotted_overrides_are_typed() -> None:
    r = load_recipe("lora", ["train.max_steps=7", "train.lr=1e-3", "lora.rank=4", "data.packing=false",
                             "lora.target_modules=[q_proj, v_proj]", "out_dir=/tmp/x"])
    assert (r.train.max_steps, r.train.lr, r.lora.rank, r.data.packing) == (7, 1e-3, 4, False)
    assert r.lora.target_modules == ["q_proj", "v_proj"] and r.out_dir == "/tmp/x"


@pytest.mark.parametrize("override,message", [
    ("train.max_step=3", "unknown fields"),
    ("train.max_steps=lots", "must be int"),
    ("train.precision=fp8", "must be one of"),
    ("lora.rank=0", "rank"),
    ("nonsense", "section.field=value"),
    ("colour=red", "unknown keys"),
])
def test_bad_overrides_are_clear_errors(override, message) -> None:
    with pytest.raises(ValueError, match=message):
        load_recipe("lora", [override])


def test_unknown_recipe() -> None:
    with pytest.raises(ValueError, match="packaged recipes"):
        load_recipe("nope")
