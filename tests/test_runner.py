"""The runner: export on a tiny model, cache hits and misses, atomic failure, the lock."""

from __future__ import annotations

import json

import pytest
from filelock import FileLock
from helpers import export_only_recipe

from pipeline.config import recipe_from_dict
from pipeline.errors import RecipeError, StageError
from pipeline.runner import Runner, build_plan
from pipeline.stages.registry import _STAGES, StageSpec


def _run(document, exported, **kwargs):
    return Runner(recipe_from_dict(document), exported=exported, **kwargs).run()


def test_export_writes_manifest_and_second_run_is_cached(tiny_ner_model, tmp_path):
    exported = tmp_path / "exported"
    first = _run(export_only_recipe(tiny_ner_model), exported)
    assert first.ran == ["fp32/export"] and first.cached == []
    folder = exported / "tiny" / "fp32" / "export"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["stage"] == "export" and manifest["config"]["opset"] == 18
    assert {o["path"] for o in manifest["outputs"]} >= {"model.onnx", "config.json", "tokenizer.json"}
    assert manifest["metrics"]["parity"]["max_abs_diff"] <= 1e-4
    assert len(manifest["metrics"]["parity"]["cases"]) == 3
    assert manifest["versions"]["onnxruntime"] and manifest["machine"]["cores"]
    mtime = (folder / "model.onnx").stat().st_mtime_ns

    second = _run(export_only_recipe(tiny_ner_model), exported)
    assert second.ran == [] and second.cached == ["fp32/export"]
    assert (folder / "model.onnx").stat().st_mtime_ns == mtime
    index = json.loads((exported / "tiny" / "variants.json").read_text())
    assert index["variants"]["fp32"]["artifact"] == "fp32/export"


def test_changed_config_reruns_and_tampered_output_reruns(tiny_ner_model, tmp_path):
    exported = tmp_path / "exported"
    _run(export_only_recipe(tiny_ner_model), exported)
    changed = export_only_recipe(tiny_ner_model)
    changed["export"]["opset"] = 17
    assert _run(changed, exported).ran == ["fp32/export"]
    # A file that no longer matches its recorded hash is never trusted.
    with open(exported / "tiny" / "fp32" / "export" / "model.onnx", "ab") as handle:
        handle.write(b"\0")
    assert _run(changed, exported).ran == ["fp32/export"]
    assert _run(changed, exported, force=True).ran == ["fp32/export"]


def _register_test_stage(name, fn):
    from pipeline.config import OptimizeConfig

    _STAGES[name] = StageSpec(name=name, config_cls=OptimizeConfig, fn=fn, consumes="onnx", produces="onnx")


def test_failing_stage_leaves_no_output_and_keeps_previous(tiny_ner_model, tmp_path, monkeypatch):
    exported = tmp_path / "exported"
    _run(export_only_recipe(tiny_ner_model), exported)
    folder = exported / "tiny" / "fp32" / "export"
    before = (folder / "manifest.json").read_text()

    def explode(ctx):
        (ctx.output_dir / "model.onnx").write_bytes(b"half written")
        raise RuntimeError("boom")

    from pipeline.stages import registry

    spec = registry.get_stage("export")
    monkeypatch.setitem(_STAGES, "export", StageSpec(**{**spec.__dict__, "fn": explode}))
    changed = export_only_recipe(tiny_ner_model)
    changed["export"]["opset"] = 17
    with pytest.raises(StageError, match="export failed: RuntimeError: boom"):
        _run(changed, exported)
    assert (folder / "manifest.json").read_text() == before  # previous output intact
    assert not list(folder.parent.glob(".tmp-*"))  # no half-written folder left behind


def test_shared_prefixes_run_once(tiny_ner_model, tmp_path):
    document = export_only_recipe(tiny_ner_model, variants={"a": [], "b": [], "c": []})
    plan = build_plan(recipe_from_dict(document), tmp_path, tiny_ner_model)
    assert len(plan.nodes) == 1
    assert plan.nodes[0].variants == ["a", "b", "c"]
    assert plan.variants["c"] is plan.nodes[0]


def test_plan_orders_torch_steps_before_export(tiny_ner_model, tmp_path):
    document = export_only_recipe(
        tiny_ner_model,
        finetune={"epochs": 1},
        data={"train": {"source": "x.conll"}},
        variants={"fp32": [], "fused": ["optimize"], "ffn": [{"prune": {"kind": "ffn"}}, "optimize"]},
    )
    plan = build_plan(recipe_from_dict(document), tmp_path, tiny_ner_model)
    chains = {name: [n.stage for n in final.chain()] for name, final in plan.variants.items()}
    assert chains == {
        "fp32": ["finetune", "export"],
        "fused": ["finetune", "export", "optimize"],
        "ffn": ["finetune", "prune", "export", "optimize"],
    }
    assert len(plan.nodes) == 6  # finetune and the dense export are shared by three variants
    assert plan.variants["fused"].parent is plan.variants["fp32"]


def test_lock_blocks_a_second_run(tiny_ner_model, tmp_path):
    exported = tmp_path / "exported"
    (exported / "tiny").mkdir(parents=True)
    with FileLock(str(exported / "tiny" / ".lock")):
        with pytest.raises(StageError, match="another run of recipe 'tiny'"):
            _run(export_only_recipe(tiny_ner_model), exported)


def test_until_unknown_stage_lists_known(tiny_ner_model, tmp_path):
    with pytest.raises(RecipeError, match="unknown stage 'exprt'; known stages: adapters, export, finetune"):
        Runner(recipe_from_dict(export_only_recipe(tiny_ner_model)), exported=tmp_path, until="exprt")


def test_symlinked_output_folder_is_refused(tiny_ner_model, tmp_path):
    exported = tmp_path / "exported"
    exported.mkdir()
    (exported / "tiny").symlink_to(tmp_path)
    with pytest.raises(RecipeError, match="escapes"):
        _run(export_only_recipe(tiny_ner_model), exported)


def test_cache_keys_cover_exactly_what_each_stage_reads(tiny_ner_model, tmp_path, monkeypatch):
    """A stage's key is built from its own section and what it declares it reads: export.parity
    re-runs export and the ONNX stages after it (their parity grid), never finetune or prune; the
    machine's INT8 capability re-runs INT8 quantization only."""
    from helpers import make_ner_examples, write_conll

    from pipeline import fingerprint

    data = write_conll(tmp_path / "ner.txt", make_ner_examples(40, seed=5))
    document = export_only_recipe(
        tiny_ner_model,
        data={"train": {"source": str(data), "split": ":80%"}},
        finetune={"epochs": 1, "batch_size": 8, "seed": 0},
        variants={
            "int8": [{"quantize": {"mode": "dynamic"}}],
            "int4": [{"quantize": {"mode": "weight_only_int4", "block_size": 16}}],
            "ffn50": [{"prune": {"kind": "ffn", "amount": 0.5}}, {"quantize": {"mode": "dynamic"}}],
        },
    )
    exported = tmp_path / "exported"
    first = _run(document, exported)
    assert sorted(first.ran) == [
        "ffn50/export",
        "ffn50/prune",
        "ffn50/quantize",
        "int4/quantize",
        "int8/export",
        "int8/finetune",
        "int8/quantize",
    ]
    manifest = json.loads((exported / "tiny" / "int8" / "quantize" / "manifest.json").read_text())
    assert manifest["reads"] == {
        "sections": ["export.parity"],
        "machine": {"int8_types": manifest["reads"]["machine"]["int8_types"]},
    }
    assert manifest["data"] == {}  # dynamic INT8 reads no calibration data

    changed = {
        **document,
        "export": {**document["export"], "parity": {"atol": 2e-4, "shapes": [[1, 8], [3, 37], [2, 64]]}},
    }
    again = _run(changed, exported)
    assert sorted(again.ran) == [
        "ffn50/export",
        "ffn50/quantize",
        "int4/quantize",
        "int8/export",
        "int8/quantize",
    ]
    assert sorted(again.cached) == ["ffn50/prune", "int8/finetune"]

    # The same exported/ folder on a CPU without VNNI: INT8 types change, so INT8 re-runs; INT4 not.
    real = fingerprint.machine_fingerprint()
    flags = {
        **real["flags"],
        "avx512_vnni": not real["flags"]["avx512_vnni"],
        "avx_vnni": False,
        "amx": False,
    }
    monkeypatch.setattr(fingerprint, "machine_fingerprint", lambda: {**real, "flags": flags})
    moved = _run(changed, exported)
    assert sorted(moved.ran) == ["ffn50/quantize", "int8/quantize"]


def test_one_failing_variant_does_not_stop_the_others(tiny_ner_model, tmp_path, capsys, write_recipe):
    """A variant whose stage fails (here: quantization beyond its parity_atol) is reported and has
    no artifact; the other variants are built; the run exits 1 naming it. When every variant
    fails, the run fails with the first cause."""
    from pipeline.cli import main
    from pipeline.errors import ParityError

    document = export_only_recipe(tiny_ner_model)
    document["variants"] = {
        "fp32": [],
        "too-strict": [{"quantize": {"mode": "dynamic", "parity_atol": 1e-9}}],
        "int8": [{"quantize": {"mode": "dynamic"}}],
    }
    exported = tmp_path / "exported"
    result = _run(document, exported)
    assert set(result.failed) == {"too-strict"} and "exceeds atol" in result.failed["too-strict"]
    assert "int8/quantize" in result.ran
    assert not (exported / "tiny" / "too-strict" / "quantize").exists()  # nothing published
    assert not list((exported / "tiny").rglob(".tmp-*"))
    index = json.loads((exported / "tiny" / "variants.json").read_text())["variants"]
    assert index["int8"]["artifact"] == "int8/quantize"

    path = write_recipe(document)
    assert main(["run", str(path), "--exported", str(exported)]) == 1
    err = capsys.readouterr().err
    assert "error: variant too-strict failed: " in err and "exceeds atol" in err

    document["variants"] = {"too-strict": document["variants"]["too-strict"]}
    with pytest.raises(ParityError, match="exceeds atol"):
        _run(document, tmp_path / "other")
