"""The validate stage: metrics on hand-checked cases, batching order, providers, the full report."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from helpers import recipe_for, stage_manifests, validated_once
from pydantic import ValidationError

from pipeline.config import LatencyConfig, ValidateConfig
from pipeline.data import TextExample, TokenExample
from pipeline.errors import RecipeError, StageError
from pipeline.onnx import session as S
from pipeline.stages import validate as V
from pipeline.stages.validate import UNSTRUCTURED_NOTE
from pipeline.tasks import Evaluator, get_task

REQUIRED_VARIANT_KEYS = {
    "metric",
    "metric_drop",
    "agreement",
    "latency",
    "speedup_vs_pytorch",
    "size_bytes",
    "stages",
}


def _cuda_really_available() -> bool:
    return S.provider_availability("CUDAExecutionProvider")[0]


@pytest.fixture(scope="module")
def ner(tmp_path_factory):
    return validated_once(tmp_path_factory)


# -- hand-checked metrics --------------------------------------------------------------------------


def test_seqeval_entity_f1_hand_checked():
    from pipeline.tasks import get_task

    task = get_task("token-classification")
    examples = [
        TokenExample(("alice", "went", "to", "paris"), ("B-PER", "O", "O", "B-LOC")),
        TokenExample(("new", "york", "is", "big"), ("B-LOC", "I-LOC", "O", "O")),
    ]
    # 3 true entities. Predicted: alice=PER (right), paris=PER (wrong type), new york=LOC (right),
    # big=LOC (spurious): precision 2/4, recall 2/3.
    predictions = [["B-PER", "O", "O", "B-PER"], ["B-LOC", "I-LOC", "O", "B-LOC"]]
    scores = task.score(predictions, examples)
    assert scores["precision"] == pytest.approx(2 / 4)
    assert scores["recall"] == pytest.approx(2 / 3)
    assert scores["f1"] == pytest.approx(2 * (0.5 * 2 / 3) / (0.5 + 2 / 3))
    assert "LOC" in task.report(predictions, examples) and "PER" in task.report(predictions, examples)
    assert get_task("token-classification").agreement(predictions, [e.tags for e in examples]) == 6 / 8


def test_classification_accuracy_macro_f1_and_agreement_hand_checked():
    from pipeline.tasks import get_task

    task = get_task("text-classification")
    examples = [
        TextExample(t, label) for t, label in [("a", "pos"), ("b", "pos"), ("c", "neg"), ("d", "neg")]
    ]
    predictions = ["pos", "neg", "neg", "neg"]
    scores = task.score(predictions, examples)
    assert scores["accuracy"] == 0.75
    # pos: P=1, R=0.5, F1=2/3; neg: P=2/3, R=1, F1=0.8 -> macro (2/3 + 0.8) / 2
    assert scores["macro_f1"] == pytest.approx((2 / 3 + 0.8) / 2)
    assert get_task("text-classification").agreement(predictions, ["pos", "pos", "neg", "pos"]) == 0.5


def test_embedding_cosine_agreement_hand_checked():
    a = np.array([[1.0, 0.0], [0.0, 2.0]])
    b = np.array([[1.0, 1.0], [0.0, 1.0]])
    assert get_task("feature-extraction").agreement(a, b) == pytest.approx((1 / np.sqrt(2) + 1.0) / 2)


# -- batching --------------------------------------------------------------------------------------


def test_evaluator_sorts_for_speed_but_keeps_the_original_order(ner):
    from pipeline.tasks import get_task, load_tokenizer

    task = get_task("token-classification")
    examples = ner["examples"]
    encoded = task.encode(load_tokenizer(ner["hf"]), examples, 32)
    seen_widths = []

    def forward(batch):  # logits that depend only on each token's own id: batching must not matter
        seen_widths.append(batch["input_ids"].shape[1])
        ids = batch["input_ids"]
        return np.stack([(ids % 3 == k).astype(np.float32) for k in range(3)], axis=-1)

    evaluator = Evaluator(task, encoded, examples, ["O", "B-LOC", "B-PER"], batch_size=5)
    sorted_predictions = evaluator.predict(forward, "fake")
    assert seen_widths == sorted(seen_widths)  # length-sorted batches: padding grows monotonically
    unsorted = task.run(forward, encoded, batch_size=5, id2label=["O", "B-LOC", "B-PER"])
    assert sorted_predictions == unsorted
    outputs = evaluator.outputs(forward, "fake")
    assert [o.shape[1] for o in outputs] == [len(ids) for ids in encoded.features["input_ids"]]


# -- configuration ---------------------------------------------------------------------------------


def test_validate_config_providers_and_latency():
    assert ValidateConfig().providers == ["CPUExecutionProvider"]
    config = ValidateConfig(providers=["CUDAExecutionProvider"])
    assert config.providers == ["CPUExecutionProvider", "CUDAExecutionProvider"]
    with pytest.raises(ValidationError, match="provider names"):
        ValidateConfig(providers=["cuda"])
    with pytest.raises(ValidationError, match="distinct"):
        LatencyConfig(batch_sizes=[1, 1])
    with pytest.raises(ValidationError):
        LatencyConfig(iters=0)


def test_check_settings_cross_section_errors(tmp_path):
    hf = tmp_path / "m"
    with pytest.raises(RecipeError, match="validate.metric: 'accuracy' is not a token-classification metric"):
        recipe = recipe_for(hf, validate={"metric": "accuracy"})
        V.check_metric(get_task(recipe.model.task), recipe.validate_)
    with pytest.raises(RecipeError, match="gates.speedup_at: 'b4_s8' is not a measured shape"):
        recipe_for(hf, gates={"speedup_at": ["b4_s8"]})
    with pytest.raises(RecipeError, match="release.fastest_at: 'b9_s9'"):
        recipe_for(hf, release={"fastest_at": "b9_s9"})
    with pytest.raises(RecipeError, match="release.pick: 'int4' is not a variant"):
        recipe_for(hf, release={"pick": "int4"})
    with pytest.raises(RecipeError, match="gates.apply_to: 'x' not a variant"):
        recipe_for(hf, gates={"apply_to": ["x"]})
    assert recipe_for(hf).primary_latency_key() == "b1_s8"
    assert recipe_for(hf, release={"fastest_at": "b2_s16"}).primary_latency_key() == "b2_s16"


def test_stage_facts_fusion_and_unstructured_note():
    facts = V.stage_facts(stage_manifests(fused=True, unstructured=True)["int8"])
    assert [s["stage"] for s in facts["stages"]] == ["prune", "export", "optimize", "quantize"]
    assert facts["attention_fusion"] == {"fused": 2, "expected": 2, "complete": True}
    assert facts["sparsity"] == {"kind": "unstructured", "sparsity": 0.5}
    assert facts["notes"] == [UNSTRUCTURED_NOTE + " (sparsity 50%)"]
    assert "history" not in facts["stages"][0]["metrics"]  # bulky metrics stay in the stage manifest
    plain = V.stage_facts(stage_manifests()["fp32"])
    assert plain["attention_fusion"] is None and plain["notes"] == []


def test_node_placement_from_a_profile(tmp_path):
    events = [
        {"cat": "Session", "name": "model_loading"},
        {
            "cat": "Node",
            "name": "a_kernel_time",
            "args": {"provider": "CUDAExecutionProvider", "op_name": "MatMul"},
        },
        {
            "cat": "Node",
            "name": "a_kernel_time",
            "args": {"provider": "CUDAExecutionProvider", "op_name": "MatMul"},
        },
        {
            "cat": "Node",
            "name": "b_kernel_time",
            "args": {"provider": "CUDAExecutionProvider", "op_name": "Attention"},
        },
        {
            "cat": "Node",
            "name": "c_kernel_time",
            "args": {"provider": "CPUExecutionProvider", "op_name": "Shape"},
        },
    ]
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(events))
    assert S.node_placement(str(path)) == {
        "CPUExecutionProvider": {"nodes": 1, "ops": {"Shape": 1}},
        "CUDAExecutionProvider": {"nodes": 2, "ops": {"Attention": 1, "MatMul": 1}},
    }
    assert not path.exists()  # profiles are deleted once read


# -- the full stage on a tiny NER model --------------------------------------------------------------


def test_report_has_the_documented_keys(ner):
    report = ner["report"]
    assert {"recipe", "machine", "baseline", "variants", "release", "gates", "metric_name"} <= set(report)
    assert report["recipe"] == "tiny-validate" and report["metric_name"] == "f1"
    assert {"metric", "latency"} <= set(report["baseline"])
    shapes = {"b1_s8", "b1_s16", "b2_s8", "b2_s16"}
    assert set(report["baseline"]["latency"]) == shapes
    for name, variant in report["variants"].items():
        assert REQUIRED_VARIANT_KEYS <= set(variant), name
        assert set(variant["latency"]) == shapes
        for key, stats in variant["latency"].items():
            assert {"p50_ms", "p90_ms", "p99_ms", "throughput_per_s"} <= set(stats)
            assert stats["p50_ms"] <= stats["p90_ms"] <= stats["p99_ms"]
            expected = round(report["baseline"]["latency"][key]["p50_ms"] / stats["p50_ms"], 4)
            assert variant["speedup_vs_pytorch"][key] == expected
            low, high = variant["speedup_ci"][key]  # the paired-bootstrap interval around it
            assert low <= variant["speedup_vs_pytorch"][key] * 1.001 and high >= low > 0
        cpu = variant["providers"]["CPUExecutionProvider"]
        assert cpu["status"] == "ok" and cpu["session_providers"][0] == "CPUExecutionProvider"
        assert cpu["node_placement"]["CPUExecutionProvider"]["nodes"] > 10
        assert variant["size_bytes"] == (ner["variants"][name] / "model.onnx").stat().st_size
        assert [s["stage"] for s in variant["stages"]] == [m["stage"] for m in ner["manifests"][name]]
    assert report["release"]["variant"] in report["variants"]
    quality = report["settings"]["timing_quality"]
    assert set(quality) == shapes and all(1 <= q["rounds"] <= 3 for q in quality.values())
    assert all(q["interfered"] == bool(q["reasons"]) for q in quality.values())
    assert "bootstrap" in report["settings"]["speedup_ci_method"]
    assert report["providers"] == {"CPUExecutionProvider": "used"}
    assert report["settings"]["eval_examples"] == len(ner["examples"])
    assert report["baseline"]["peak_rss_bytes"] > 0  # measured in a fresh process per candidate
    assert all(v["peak_rss_bytes"] > 0 for v in report["variants"].values())
    assert "fresh process" in report["settings"]["memory_method"]


def test_fp32_export_scores_exactly_like_pytorch(ner):
    report = ner["report"]
    fp32 = report["variants"]["fp32"]
    assert fp32["metric"] == report["baseline"]["metric"]
    assert fp32["metric_drop"] == 0.0 and fp32["agreement"] == 1.0
    assert fp32["metrics"].keys() == {"f1", "precision", "recall", "token_accuracy"}
    assert "micro avg" in report["baseline"]["classification_report"]
    assert report["variants"]["int8"]["agreement"] > 0.5


def test_report_files_written(ner):
    out = ner["out"]
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "report.json", "report.md", "report.png"]
    assert json.loads((out / "report.json").read_text())["recipe"] == "tiny-validate"
    md = re.sub(" +", " ", (out / "report.md").read_text())  # tabulate pads the table cells
    assert "| PyTorch eager fp32 (baseline) |" in md and "speed-up b1_s8" in md and "micro avg" in md


def _quick(ner, tmp_path, **validate):
    from helpers import validate_into

    settings = {
        "latency": {"batch_sizes": [1], "seq_lens": [8], "warmup": 0, "iters": 2, "threads": 1},
        "max_eval_examples": 4,
        "measure_memory": False,
        **validate,
    }
    recipe = recipe_for(ner["hf"], validate=settings)
    return validate_into(recipe, ner["variants"], ner["hf"], ner["data"], ner["manifests"], tmp_path / "out")


@pytest.mark.skipif(_cuda_really_available(), reason="this machine has a usable CUDA provider")
def test_cuda_absent_is_reported_never_measured(ner, tmp_path):
    report = _quick(ner, tmp_path, providers=["CPUExecutionProvider", "CUDAExecutionProvider"])
    assert report["providers"]["CUDAExecutionProvider"].startswith("not available on this machine")
    entry = report["variants"]["int8"]["providers"]["CUDAExecutionProvider"]
    assert (
        entry["status"] == "not available on this machine"
        and "latency" not in entry
        and "metric" not in entry
    )
    assert "- CUDA: not available on this machine" in (tmp_path / "out" / "report.md").read_text()


@pytest.mark.skipif(_cuda_really_available(), reason="this machine has a usable CUDA provider")
def test_silent_fallback_fails_unless_allowed(ner, tmp_path, monkeypatch):
    # Pretend a GPU provider is usable: the CPU-only onnxruntime then silently runs the session on CPU.
    real = S.provider_availability
    monkeypatch.setattr(
        S, "provider_availability", lambda p: (True, "") if p != "CPUExecutionProvider" else real(p)
    )
    with pytest.raises(
        StageError, match="asked for CUDAExecutionProvider but the session runs on CPUExecutionProvider"
    ):
        _quick(ner, tmp_path, providers=["CUDAExecutionProvider"])
    report = _quick(
        ner, tmp_path / "allowed", providers=["CUDAExecutionProvider"], allow_provider_fallback=True
    )
    entry = report["variants"]["fp32"]["providers"]["CUDAExecutionProvider"]
    assert entry["status"] == "fell back to CPUExecutionProvider"
    assert "latency" not in entry and "metric" not in entry


def test_provider_availability_does_not_trust_the_package_list(monkeypatch):
    import onnxruntime as ort

    monkeypatch.setattr(
        ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    monkeypatch.setattr(S, "gpu_present", lambda: False)
    assert S.provider_availability("CUDAExecutionProvider") == (False, "no NVIDIA GPU found")
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    usable, reason = S.provider_availability("TensorrtExecutionProvider")
    assert not usable and "has no TensorrtExecutionProvider" in reason
    assert S.provider_availability("CPUExecutionProvider") == (True, "")


def test_seq_len_beyond_the_model_is_a_recipe_error(ner, tmp_path):
    with pytest.raises(RecipeError, match="exceeds the model's max_position_embeddings 128"):
        _quick(ner, tmp_path, latency={"batch_sizes": [1], "seq_lens": [256], "iters": 1})


@pytest.mark.cuda
@pytest.mark.skipif(not _cuda_really_available(), reason="needs onnxruntime-gpu and an NVIDIA GPU")
def test_cuda_provider_really_used(ner, tmp_path):
    report = _quick(ner, tmp_path, providers=["CPUExecutionProvider", "CUDAExecutionProvider"])
    entry = report["variants"]["fp32"]["providers"]["CUDAExecutionProvider"]
    assert entry["status"] == "ok" and entry["session_providers"][0] == "CUDAExecutionProvider"
    assert entry["node_placement"]["CUDAExecutionProvider"]["nodes"] > 0
    assert entry["latency"]["b1_s8"]["p50_ms"] > 0


# -- other tasks -----------------------------------------------------------------------------------


@pytest.mark.parametrize("task", ["text-classification", "feature-extraction"])
def test_other_tasks_validate(tmp_path_factory, task):
    from helpers import run_validation

    run = run_validation(
        tmp_path_factory.mktemp(task),
        task,
        validate={
            "latency": {"batch_sizes": [1], "seq_lens": [8], "warmup": 0, "iters": 2, "threads": 1},
            "eval_batch_size": 7,
            "measure_memory": False,
        },
    )
    report = run["report"]
    fp32 = report["variants"]["fp32"]
    if task == "text-classification":
        assert report["metric_name"] == "accuracy"
        assert set(fp32["metrics"]) == {"accuracy", "macro_f1"}
        assert fp32["agreement"] == 1.0 and fp32["metric_drop"] == 0.0
    else:
        assert report["metric_name"] == "probe_accuracy"
        assert {"probe_accuracy", "cosine_mean", "cosine_min"} <= set(fp32["metrics"])
        assert report["baseline"]["metrics"]["cosine_mean"] == pytest.approx(1.0)
        assert fp32["metrics"]["cosine_min"] > 0.9999 and fp32["agreement"] > 0.9999
        assert report["variants"]["int8"]["metrics"]["cosine_mean"] > 0.9


@pytest.mark.parametrize(("free_bytes", "workers"), [(10**12, 2), (10, 1)])
def test_memory_probes_run_two_at_once_only_when_memory_allows(tmp_path, monkeypatch, free_bytes, workers):
    """Each candidate's probe result lands on that candidate, whether the probes run in parallel
    (free memory holds two peaks) or one after the other (it does not)."""
    import threading
    import time
    from types import SimpleNamespace

    import psutil

    from pipeline.bench import memprobe

    hf = tmp_path / "hf"
    hf.mkdir()
    variants = {}
    for index, name in enumerate(["a", "b", "c"]):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "model.onnx").write_bytes(b"x" * (10 + index))
        variants[name] = (folder, [])
    running, most = [0], [0]
    lock = threading.Lock()

    def fake_probe(kind, path, **_):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.05)
        with lock:
            running[0] -= 1
        return {"delta_bytes": 1000 if kind == "torch" else int(path.stat().st_size)}

    monkeypatch.setattr(memprobe, "measure_peak_memory", fake_probe)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=free_bytes))
    ctx = SimpleNamespace(
        input_dir=str(hf),
        variants=variants,
        config=SimpleNamespace(latency=SimpleNamespace(threads=1)),
        task=SimpleNamespace(name="text-generation"),
    )
    baseline: dict = {"size_bytes": 100}  # as _measure records it for the HF folder
    entries = {name: {"providers": {S.CPU: {}}} for name in variants}
    labels = {(name, S.CPU): name for name in variants}
    V._probe_memory(ctx, baseline, entries, labels, (1, 8), 100)
    assert baseline["peak_rss_bytes"] == 1000
    assert {n: e["providers"][S.CPU]["peak_rss_bytes"] for n, e in entries.items()} == {
        "a": 10,
        "b": 11,
        "c": 12,
    }
    assert most[0] == workers
