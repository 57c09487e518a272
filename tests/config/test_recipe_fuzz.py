"""Property test: any document thrown at the recipe validator ends in RecipeError or a Recipe."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.config import Recipe, recipe_from_dict
from pipeline.errors import RecipeError

KEYS = [
    "name",
    "model",
    "source",
    "task",
    "data",
    "train",
    "eval",
    "export",
    "opset",
    "parity",
    "shapes",
    "atol",
    "variants",
    "fp32",
    "quantize",
    "optimize",
    "prune",
    "mode",
    "kind",
    "amount",
    "finetune",
    "epochs",
    "validate",
    "gates",
    "release",
    "calibration",
    "samples",
]
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 300),
    st.floats(allow_nan=True),
    st.text(max_size=12),
    st.sampled_from(["token-classification", "dynamic", "ffn", "../x", "fp32"]),
)
documents = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(
            st.one_of(st.sampled_from(KEYS), st.text(max_size=6), st.integers()), children, max_size=5
        ),
    ),
    max_leaves=25,
)
base = {"name": "fuzz", "model": {"source": "package:x", "task": "token-classification"}}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents)
def test_random_documents_never_crash(document):
    _check(document)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(KEYS), documents)
def test_random_sections_of_a_valid_recipe_never_crash(key, value):
    _check({**base, key: value})


def _check(document):
    try:
        result = recipe_from_dict(document, "fuzz.yaml")
    except RecipeError as err:
        message = str(err)
        assert message.startswith("fuzz.yaml: ") and "\n" not in message and "Traceback" not in message
    else:
        assert isinstance(result, Recipe)
