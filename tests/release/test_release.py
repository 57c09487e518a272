"""Release pick, bundle and `verify`: good and tampered bundles, no torch, the README snippet runs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, build_bundle, crafted_report, recipe_for, run_readme_snippet, validated_once

from pipeline.cli import main
from pipeline.errors import InputError
from pipeline.release import pick_release, verify_command, verify_release


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    run = validated_once(tmp_path_factory)
    out = tmp_path_factory.mktemp("release") / "release"
    out.mkdir()
    manifest = build_bundle(run["recipe"], run["report"], run["variants"], run["manifests"], out)
    return {**run, "bundle": out, "manifest": manifest}


@pytest.fixture
def bundle(released, tmp_path):
    """A private copy of the good bundle to tamper with."""
    return Path(shutil.copytree(released["bundle"], tmp_path / "release"))


# -- the pick --------------------------------------------------------------------------------------


def pick(recipe, report):
    return pick_release(recipe.gates, recipe.release, report)


def test_pick_fastest_within_gates(tmp_path):
    report = crafted_report()
    assert pick(recipe_for(tmp_path), report)["variant"] == "int8"
    strict = recipe_for(tmp_path, gates={"max_metric_drop": 0.005})
    strict_pick = pick(strict, report)
    assert strict_pick["variant"] == "fp32" and strict_pick["reason"].startswith(
        "fastest within all gates; p50 10 ms at b1_s64"
    )
    # Ranking at another shape: at b8_s64 int8 is still the fastest.
    at_b8 = recipe_for(
        tmp_path,
        release={"fastest_at": "b8_s64"},
        validate={"latency": {"batch_sizes": [1, 8], "seq_lens": [64]}},
    )
    assert pick(at_b8, report)["variant"] == "int8"


def test_pick_named_and_nothing_passing(tmp_path):
    report = crafted_report()
    named = pick(recipe_for(tmp_path, release={"pick": "fp32"}), report)
    assert named["variant"] == "fp32" and named["reason"].startswith("named by release.pick")
    failing = pick(recipe_for(tmp_path, release={"pick": "int8"}, gates={"max_metric_drop": 0.001}), report)
    assert (
        failing["variant"] is None
        and "release.pick 'int8' fails its gates: int8/max_metric_drop" in failing["reason"]
    )
    none = pick(recipe_for(tmp_path, gates={"min_speedup_vs_pytorch": 10.0}), report)
    assert none["variant"] is None
    assert none["reason"].startswith("no variant passes all gates: fp32: fp32/min_speedup_vs_pytorch: 2.5")


def test_no_release_writes_nothing(released, tmp_path):
    report = dict(released["report"], release={"variant": None, "reason": "no variant passes all gates"})
    out = tmp_path / "empty"
    out.mkdir()
    assert build_bundle(released["recipe"], report, released["variants"], released["manifests"], out) is None
    assert list(out.iterdir()) == []


# -- the bundle ------------------------------------------------------------------------------------


def test_bundle_contents_and_manifest(released):
    bundle, manifest = released["bundle"], released["manifest"]
    chosen = released["report"]["release"]["variant"]
    names = sorted(p.name for p in bundle.iterdir())
    assert {"model.onnx", "config.json", "tokenizer.json", "manifest.json", "README.md"} <= set(names)
    assert (bundle / "model.onnx").read_bytes() == (released["variants"][chosen] / "model.onnx").read_bytes()
    assert sorted(f["path"] for f in manifest["files"]) == sorted(n for n in names if n != "manifest.json")
    assert manifest["task"] == "token-classification" and manifest["labels"] == ["O", "B-LOC", "B-PER"]
    model = manifest["model"]
    assert [i["name"] for i in model["inputs"]] == ["input_ids", "attention_mask", "token_type_ids"]
    assert model["inputs"][0]["dtype"] == "int64" and model["inputs"][0]["dynamic_axes"] == {
        "0": "batch_size",
        "1": "sequence_length",
    }
    assert model["outputs"][0]["name"] == "logits" and model["opset"] == 17
    made = manifest["made_by"]
    assert [s["stage"] for s in made["stages"]] == [m["stage"] for m in released["manifests"][chosen]]
    if chosen == "int8":
        assert made["calibration_data_sha256"] == "c" * 64
    quality = manifest["quality"]
    assert (
        quality["metric_name"] == "f1"
        and quality["metric"] == released["report"]["variants"][chosen]["metric"]
    )
    assert quality["metric_drop_vs_fp32"] is not None and quality["eval_data_sha256"]
    assert (
        manifest["speed"]["measured_on"]["cpu_model"]
        and manifest["speed"]["latency_cpu"]["b1_s8"]["p50_ms"] > 0
    )
    assert manifest["providers"]["validated"]["CPUExecutionProvider"]["status"] == "ok"
    assert manifest["providers"]["session_options"]["intra_op_num_threads"] == 1
    assert manifest["smoke"]["output"] == "logits"


def test_verify_accepts_the_good_bundle(released, capsys):
    assert verify_release(released["bundle"]) == []
    assert verify_command(released["bundle"]) == 0
    assert "OK (" in capsys.readouterr().out


def test_one_changed_byte_is_caught(bundle, capsys):
    model = bundle / "model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01
    model.write_bytes(bytes(data))
    problems = verify_release(bundle)
    assert problems[0].startswith("model.onnx: sha256 ") and "does not match the manifest" in problems[0]
    assert problems[-1] == "smoke inference skipped: the files do not match the manifest"
    assert main(["verify", str(bundle)]) == 1
    assert "FAIL model.onnx: sha256" in capsys.readouterr().out


def test_missing_and_extra_files_are_caught(bundle):
    (bundle / "vocab.txt").unlink()
    (bundle / "notes.txt").write_text("left behind")
    problems = verify_release(bundle)
    assert "vocab.txt: listed in manifest.json but missing" in problems
    assert "notes.txt: not listed in manifest.json (unexpected file)" in problems


def test_tampered_manifest_or_config(bundle):
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"][0]["bytes"] += 1
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    assert any("bytes, manifest says" in p for p in verify_release(bundle))
    (bundle / "manifest.json").write_text("{broken")
    assert verify_release(bundle) == [
        f"{bundle / 'manifest.json'}: unreadable or not valid JSON (JSONDecodeError)"
    ]


def test_smoke_inference_mismatch_is_caught(bundle):
    good = json.loads((bundle / "manifest.json").read_text())
    wrong_shape = json.loads(json.dumps(good))
    wrong_shape["smoke"]["shape"] = [1, 3, 3]
    (bundle / "manifest.json").write_text(json.dumps(wrong_shape))
    problems = verify_release(bundle)
    assert len(problems) == 1 and problems[0].startswith("smoke inference: output shape [1, ")
    wrong_argmax = json.loads(json.dumps(good))
    wrong_argmax["smoke"]["argmax"] = [99] * len(good["smoke"]["argmax"])
    (bundle / "manifest.json").write_text(json.dumps(wrong_argmax))
    assert verify_release(bundle) == [
        "smoke inference: argmax agrees with the recorded output on 0% of positions (need 90%)"
    ]
    (bundle / "manifest.json").write_text(json.dumps(good))
    assert verify_release(bundle) == []


def test_verify_command_bad_folder(tmp_path, capsys):
    with pytest.raises(InputError, match="not a folder"):
        verify_command(tmp_path / "absent")
    with pytest.raises(InputError, match="no manifest.json; not a release bundle"):
        verify_command(tmp_path)
    assert main(["verify", str(tmp_path)]) == 2
    assert "not a release bundle" in capsys.readouterr().err


def test_verify_imports_neither_torch_nor_transformers(released):
    code = (
        "import sys\n"
        "from pipeline.release import verify_release\n"
        f"problems = verify_release({str(released['bundle'])!r})\n"
        "assert problems == [], problems\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'optimum') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
        "print('clean')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and "clean" in result.stdout, result.stderr[-2000:]


def test_readme_snippet_runs_with_onnxruntime_and_tokenizers_only(released, tmp_path):
    result = run_readme_snippet(released["bundle"], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert lines[0].split()[0] == "Alice" and lines[0].split()[1] in ("O", "B-LOC", "B-PER")
    assert len(lines) == 7  # one tag per word


def test_external_data_travels_and_is_verified(released, tmp_path):
    import onnx

    chosen = released["report"]["release"]["variant"]
    source = Path(shutil.copytree(released["variants"][chosen], tmp_path / "external"))
    model = onnx.load(str(source / "model.onnx"))
    (source / "model.onnx").unlink()
    onnx.save_model(
        model,
        str(source / "model.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="model.onnx.data",
        size_threshold=256,
    )
    out = tmp_path / "release"
    variants = {**released["variants"], chosen: source}
    manifest = build_bundle(released["recipe"], released["report"], variants, released["manifests"], out)
    assert manifest["model"]["external_data"] == ["model.onnx.data"]
    assert "model.onnx.data" in {f["path"] for f in manifest["files"]}
    assert verify_release(out) == []
    data = bytearray((out / "model.onnx.data").read_bytes())
    data[-1] ^= 0xFF
    (out / "model.onnx.data").write_bytes(bytes(data))
    assert verify_release(out)[0].startswith("model.onnx.data: sha256 ")
