"""The offline decoder recipe end to end through the runner: KV-cache export, INT8, INT4, release."""

from __future__ import annotations

import json

from helpers import ROOT

from pipeline.cli import main
from pipeline.zoo.tiny_decoder import build_tiny_decoder


def test_tiny_gpt2_recipe_runs_and_releases(tmp_path):
    model = build_tiny_decoder(tmp_path / "tiny-gpt2", arch="gpt2", train_steps=0)
    exported = tmp_path / "out"
    args = [
        "run",
        str(ROOT / "recipes/tiny-gpt2-offline.yaml"),
        "--exported",
        str(exported),
        "--set",
        f"model.source={model}",
        "--set",
        "variants={fp32: [], int8-dynamic: [{quantize: {mode: dynamic}}], "
        "int4-b32: [{quantize: {mode: weight_only_int4, block_size: 32}}]}",
        "--set",
        "data.eval.limit=8",
    ]
    assert main(args) == 0
    root = exported / "tiny-gpt2-offline"
    report = json.loads((root / "report.json").read_text())
    assert report["metric_name"] == "perplexity" and report["metric_higher_is_better"] is False
    assert set(report["variants"]) == {"fp32", "int8-dynamic", "int4-b32"}
    assert abs(report["variants"]["fp32"]["metric"] - report["baseline"]["metric"]) < 1e-2
    export = json.loads((root / "fp32" / "export" / "manifest.json").read_text())
    assert any(
        name.startswith("past_key_values") for name in export["metrics"]["inputs"]
    ) or "past" in json.dumps(export["metrics"])
    int4 = json.loads((root / "int4-b32" / "quantize" / "manifest.json").read_text())
    assert "MatMulNBits" in json.dumps(int4["metrics"])
    assert main(["verify", str(root / "release")]) == 0
