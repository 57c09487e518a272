"""Export stage: ONNX matches PyTorch on a grid of shapes; a mismatch fails and publishes nothing."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import CLS_LABELS, export_only_recipe, tiny_model

from pipeline.config import recipe_from_dict
from pipeline.errors import InputError, ParityError
from pipeline.onnx.session import open_session
from pipeline.runner import Runner

OUTPUTS = {
    "text-classification": ["logits"],
    "feature-extraction": ["last_hidden_state"],
    "question-answering": ["start_logits", "end_logits"],
}
HEADS = {"text-classification": "sequence", "feature-extraction": "base", "question-answering": "qa"}


@pytest.mark.parametrize("task", sorted(OUTPUTS))
def test_export_tasks_have_dynamic_axes(task, tmp_path):
    model_dir = tiny_model(tmp_path / "m", head=HEADS[task], labels=CLS_LABELS)
    document = export_only_recipe(model_dir)
    document["model"]["task"] = task
    Runner(recipe_from_dict(document), exported=tmp_path / "out").run()
    folder = tmp_path / "out" / "tiny" / "fp32" / "export"
    metrics = json.loads((folder / "manifest.json").read_text())["metrics"]
    assert metrics["outputs"] == OUTPUTS[task]
    assert [s["seq"] for s in metrics["parity"]["cases"]] == [8, 37, 64]
    session = open_session(folder / "model.onnx")
    # A shape outside the parity grid also runs: batch and sequence axes are dynamic.
    feeds = {i.name: np.ones((5, 19), dtype=np.int64) for i in session.get_inputs()}
    assert session.run(None, feeds)[0].shape[0] == 5


def test_parity_failure_is_an_error_and_publishes_nothing(tiny_ner_model, tmp_path):
    document = export_only_recipe(tiny_ner_model)
    document["export"]["parity"]["atol"] = 1e-12
    with pytest.raises(ParityError, match=r"export parity .* exceeds atol 1e-12"):
        Runner(recipe_from_dict(document), exported=tmp_path / "out").run()
    variant = tmp_path / "out" / "tiny" / "fp32"
    assert not (variant / "export").exists()
    assert not list(variant.glob(".tmp-*"))


def test_corrupt_onnx_is_a_clear_input_error(tmp_path):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"this is not onnx")
    with pytest.raises(InputError, match="ONNX Runtime cannot load this model"):
        open_session(bad)


def test_missing_model_folder_is_input_error(tmp_path):
    document = export_only_recipe(tmp_path / "does-not-exist")
    with pytest.raises(InputError, match="does not exist"):
        Runner(recipe_from_dict(document), exported=tmp_path / "out").run()


def test_external_data_flows_through_export(tiny_ner_model, tmp_path, monkeypatch):
    """Models over 2 GB keep weights in model.onnx.data; a lowered threshold exercises that path."""
    from pipeline.onnx import io as onnx_utils

    monkeypatch.setattr(onnx_utils, "EXTERNAL_DATA_THRESHOLD", 100_000)
    Runner(recipe_from_dict(export_only_recipe(tiny_ner_model)), exported=tmp_path / "out").run()
    folder = tmp_path / "out" / "tiny" / "fp32" / "export"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["metrics"]["external_data"] is True
    assert (folder / "model.onnx.data").stat().st_size > (folder / "model.onnx").stat().st_size
    assert "model.onnx.data" in {o["path"] for o in manifest["outputs"]}
