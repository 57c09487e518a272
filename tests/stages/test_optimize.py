"""The optimize stage on tiny BERTs: fused-op counts, failing when fusion falls short, clear errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from helpers import export_onnx, make_ctx, tiny_model
from pydantic import ValidationError

from pipeline.config import OptimizeConfig
from pipeline.errors import InputError, StageError
from pipeline.onnx.session import open_session
from pipeline.stages.optimize import optimize
from pipeline.tasks import dummy_inputs


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    root = tmp_path_factory.mktemp("opt")
    return export_onnx(tiny_model(root / "hf", labels=5, classifier_scale=20.0), root / "onnx")


def test_fuses_tiny_bert_fully_and_keeps_parity(tiny_onnx, tmp_path):
    out = tmp_path / "out"
    metrics = optimize(make_ctx(OptimizeConfig(), tiny_onnx, out))

    fused = metrics["fused_ops"]
    assert fused["Attention"] == 2 == metrics["expected_fusion"]["Attention"]  # one per layer
    assert fused["EmbedLayerNormalization"] == 1
    assert fused["SkipLayerNormalization"] == 4
    assert fused["BiasGelu"] == 2
    assert metrics["attention_fusion_complete"] and metrics["fully_optimized"]
    assert metrics["ort_fused_operator_statistics"]["Attention"] == 2
    assert (metrics["num_heads"], metrics["hidden_size"], metrics["num_layers"]) == (2, 32, 2)
    assert metrics["parity"]["max_abs_diff"] < 1e-3
    assert len(metrics["parity"]["cases"]) == 3
    json.dumps(metrics)  # manifest-ready

    # The artifact is self-contained: model + config + tokenizer, and it runs.
    assert {"model.onnx", "config.json", "tokenizer.json", "vocab.txt"} <= {p.name for p in out.iterdir()}
    assert metrics["size_bytes"] == (out / "model.onnx").stat().st_size
    session = open_session(out / "model.onnx")
    feeds = dummy_inputs([i.name for i in session.get_inputs()], 2, 11, 30522)
    (logits,) = session.run(None, feeds)
    assert logits.shape == (2, 11, 5) and np.isfinite(logits).all()


def _break_attention(src, dst):
    """Copy an export with one extra Mul on each attention-probability path: ORT no longer
    recognises the attention pattern (what an exporter change does to a real graph)."""
    shutil.copytree(src, dst)
    model = onnx.load(str(dst / "model.onnx"))
    graph = model.graph
    graph.initializer.append(onnx.numpy_helper.from_array(np.array(0.999, dtype=np.float32), "k0999"))
    nodes = list(graph.node)
    for index in reversed(range(len(nodes))):
        node = nodes[index]
        if node.op_type == "Softmax":
            out = node.output[0]
            node.output[0] = out + "_raw"
            graph.node.insert(index + 1, onnx.helper.make_node("Mul", [out + "_raw", "k0999"], [out]))
    onnx.save(model, str(dst / "model.onnx"))
    return dst


def test_fails_when_attention_fusion_falls_short(tiny_onnx, tmp_path):
    broken = _break_attention(tiny_onnx, tmp_path / "broken")
    with pytest.raises(StageError, match=r"attention fusion fell short: 0 fused attention nodes, expected 2"):
        optimize(make_ctx(OptimizeConfig(), broken, tmp_path / "out"))

    # Opting out publishes the partially fused model, and says so in the metrics.
    metrics = optimize(make_ctx(OptimizeConfig(require_attention_fusion=False), broken, tmp_path / "out2"))
    assert metrics["fused_ops"]["Attention"] == 0
    assert metrics["attention_fusion_complete"] is False
    assert metrics["fused_ops"]["SkipLayerNormalization"] == 4  # the rest still fused


def test_dynamo_export_is_caught(tmp_path):
    """The real breakage from DESIGN.md §7: torch.onnx dynamo exports get no Attention fusion."""
    pytest.importorskip("onnxscript")
    hf = tiny_model(tmp_path / "hf", layers=1, labels=5, classifier_scale=20.0)
    exported = export_onnx(hf, tmp_path / "dyn", dynamo=True)
    with pytest.raises(StageError, match="attention fusion fell short"):
        optimize(make_ctx(OptimizeConfig(), exported, tmp_path / "out"))


@pytest.mark.parametrize(
    ("prune", "heads", "hidden"),
    [({0: [1], 1: [2]}, 3, 24), ({0: [1, 3]}, 0, 0)],  # uniform: 4-1 heads; non-uniform: ORT detects
)
def test_pruned_heads_are_read_from_the_config(tmp_path, prune, heads, hidden):
    hf = tiny_model(tmp_path / "hf", heads=4, labels=5, classifier_scale=20.0, prune_heads=prune)
    metrics = optimize(make_ctx(OptimizeConfig(), export_onnx(hf, tmp_path / "onnx"), tmp_path / "out"))
    assert (metrics["num_heads"], metrics["hidden_size"]) == (heads, hidden)
    assert metrics["fused_ops"]["Attention"] == 2


def test_unsupported_model_type_is_an_input_error(tiny_onnx, tmp_path):
    other = shutil.copytree(tiny_onnx, tmp_path / "mpnet")
    config = json.loads((other / "config.json").read_text())
    config["model_type"] = "mpnet"
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match=r"model_type 'mpnet' is not supported.*supported: .*bert.*roberta"):
        optimize(make_ctx(OptimizeConfig(), other, tmp_path / "out"))
    assert not (tmp_path / "out" / "model.onnx").exists()


def test_missing_config_is_an_input_error(tiny_onnx, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(tiny_onnx / "model.onnx", bare / "model.onnx")
    with pytest.raises(InputError, match="no config.json"):
        optimize(make_ctx(OptimizeConfig(), bare, tmp_path / "out"))


def test_fp16_is_gpu_only(tiny_onnx, tmp_path):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("a CUDA build of ONNX Runtime is installed")
    with pytest.raises(InputError, match="GPU-only"):
        optimize(make_ctx(OptimizeConfig(fp16=True), tiny_onnx, tmp_path / "out"))


def test_config_rejects_unknown_values():
    with pytest.raises(ValidationError):
        OptimizeConfig(opt_level=3)
    with pytest.raises(ValidationError):
        OptimizeConfig(model_type="mpnet")
    with pytest.raises(ValidationError):
        OptimizeConfig(fuse=True)
    with pytest.raises(ValidationError, match="only applies with fp16"):
        OptimizeConfig(fp16_op_block_list=["Softmax"])
    assert OptimizeConfig(fp16=True, fp16_op_block_list=["Softmax"]).fp16


def test_external_data_flows_through(tiny_onnx, tmp_path, monkeypatch):
    from pipeline.onnx import io as onnx_utils

    monkeypatch.setattr(onnx_utils, "EXTERNAL_DATA_THRESHOLD", 1000)
    metrics = optimize(make_ctx(OptimizeConfig(), tiny_onnx, tmp_path / "out"))
    assert metrics["external_data"] is True
    assert (tmp_path / "out" / "model.onnx.data").is_file()
    assert metrics["size_bytes"] > (tmp_path / "out" / "model.onnx.data").stat().st_size
