"""The quantize stage on tiny BERTs: dynamic/static/INT4 op counts, calibration, auto-exclusion."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from helpers import NER_LABELS, calibration_data, export_onnx, make_ctx, ner_sentences, tiny_model
from pydantic import ValidationError

from pipeline.config import OptimizeConfig, QuantizeConfig
from pipeline.data import TextExample
from pipeline.errors import InputError, ParityError
from pipeline.onnx.session import open_session
from pipeline.quantization.exclusion import greedy_exclusion, input_ranges
from pipeline.quantization.types import default_int8_types
from pipeline.stages.optimize import optimize
from pipeline.stages.quantize import quantize
from pipeline.tasks import dummy_inputs

# 2 layers x (Q, K, V, attention output, FFN in, FFN out) + classifier: MatMuls with weights.
WEIGHT_MATMULS = 13
VNNI = {"arch": "x86_64", "cpu_vendor": "AuthenticAMD", "flags": {"avx512_vnni": True}}
NO_VNNI = {"arch": "x86_64", "cpu_vendor": "GenuineIntel", "flags": {"avx2": True}}
ARM = {"arch": "aarch64", "cpu_vendor": "", "flags": {"arm_dotprod": True}}


def _machine(base):
    flags = dict.fromkeys(("avx2", "avx512", "avx512_vnni", "avx_vnni", "amx", "arm_dotprod"), False)
    return {**base, "flags": {**flags, **base["flags"]}}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    plain = export_onnx(tiny_model(root / "hf", labels=NER_LABELS, classifier_scale=20.0), root / "onnx")
    optimize(make_ctx(OptimizeConfig(), plain, root / "fused"))
    hf_outlier = tiny_model(root / "hf-outlier", labels=NER_LABELS, classifier_scale=20.0, outlier_layer=0)
    outlier = export_onnx(hf_outlier, root / "onnx-outlier")
    return {"plain": plain, "fused": root / "fused", "outlier": outlier}


@pytest.fixture(scope="module")
def calibration():
    return calibration_data(ner_sentences(24))


def _run(config, src, out, data=None, machine=None):
    return quantize(make_ctx(config, src, out, data=data, machine=machine and _machine(machine)))


def _sha(folder):
    return hashlib.sha256((folder / "model.onnx").read_bytes()).hexdigest()


def _runs(folder):
    session = open_session(folder / "model.onnx")
    (logits,) = session.run(None, dummy_inputs([i.name for i in session.get_inputs()], 2, 9, 30522))
    assert logits.shape == (2, 9, 5) and np.isfinite(logits).all()


def test_dynamic_on_unfused_export(models, tmp_path):
    metrics = _run(QuantizeConfig(mode="dynamic"), models["plain"], tmp_path / "q", machine=VNNI)
    ops = metrics["quantized_ops"]
    assert ops["MatMulInteger"] == WEIGHT_MATMULS
    assert ops["DynamicQuantizeLinear"] > 0
    assert ops["MatMul"] == 4  # activation x activation attention MatMuls stay float (const-B only)
    assert metrics["settings"]["weight_type"] == "QInt8" and metrics["settings"]["reduce_range"] is False
    assert metrics["parity"]["argmax_agreement"] >= 0.9 and metrics["parity"]["atol"] is None
    assert metrics["size_bytes"] < metrics["input_size_bytes"] / 2  # embeddings int8 too (Gather)
    json.dumps(metrics)
    _runs(tmp_path / "q")
    assert (tmp_path / "q" / "tokenizer.json").is_file()


def test_dynamic_on_fused_model(models, tmp_path):
    """A fused input needs DefaultTensorType (DESIGN.md §7); the stage always passes it."""
    metrics = _run(QuantizeConfig(mode="dynamic"), models["fused"], tmp_path / "q")
    ops = metrics["quantized_ops"]
    assert ops["QAttention"] == 2 and ops["QEmbedLayerNormalization"] == 1
    assert ops["MatMulInteger"] == WEIGHT_MATMULS - 2 * 3  # Q, K, V live inside QAttention
    _runs(tmp_path / "q")


@pytest.mark.parametrize("fmt,integer_ops", [("QDQ", True), ("QDQ", False), ("QOperator", True)])
def test_static_quantizes_matmuls_only(models, calibration, tmp_path, fmt, integer_ops):
    metrics = _run(
        QuantizeConfig(mode="static", format=fmt, integer_ops=integer_ops),
        models["plain"],
        tmp_path / "q",
        calibration,
        VNNI,
    )
    ops, settings = metrics["quantized_ops"], metrics["settings"]
    assert settings["activation_type"] == "QUInt8" and settings["weight_type"] == "QInt8"
    # The token-embedding Gather too (quantize_embedding: on by default for static INT8).
    assert settings["op_types"] == ["MatMul", "Gemm", "Gather"] and settings["calibration_examples"] == 24
    assert ops["MatMulInteger"] == 0
    if fmt == "QDQ" and integer_ops:
        # Every weight MatMul and its bias Add is one MatMulIntegerToFloat; the 4 attention products
        # keep their Q/DQ (ORT makes them QLinearMatMul).
        assert ops["MatMulIntegerToFloat"] == WEIGHT_MATMULS and ops["MatMul"] == 4
        folded = settings["integer_ops"]
        assert folded["matmuls_to_integer_ops"] == folded["biases_folded"] == WEIGHT_MATMULS
        assert folded["float_readers_rewired"] > 0
    elif fmt == "QDQ":
        assert settings["integer_ops"] is None and ops["MatMulIntegerToFloat"] == 0
        assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] >= WEIGHT_MATMULS
        assert ops["MatMul"] == WEIGHT_MATMULS + 4  # kept, with Q/DQ around them
    else:
        assert ops["QLinearMatMul"] == WEIGHT_MATMULS + 4 and ops["MatMul"] == 0
    assert metrics["parity"]["argmax_agreement"] >= 0.8  # random inputs: a sanity floor
    _runs(tmp_path / "q")


@pytest.mark.parametrize("method", ["Entropy", "Percentile"])
def test_static_on_fused_model_with_histogram_calibration(models, calibration, tmp_path, method):
    """Fused graphs need symbolic shape inference, or the calibrator silently skips tensors;
    histogram methods need one example per collection (examples differ in length)."""
    metrics = _run(
        QuantizeConfig(mode="static", calibration=method), models["fused"], tmp_path / "q", calibration
    )
    ops = metrics["quantized_ops"]
    assert ops["QuantizeLinear"] > 0  # Q/K/V live inside Attention: the other weight MatMuls fold
    assert ops["MatMulIntegerToFloat"] == WEIGHT_MATMULS - 6 and ops["MatMul"] == 0
    assert metrics["settings"]["calibration"] == method
    _runs(tmp_path / "q")


def test_calibration_is_deterministic(models, calibration, tmp_path):
    config = QuantizeConfig(mode="static", calibration="Entropy")
    _run(config, models["plain"], tmp_path / "a", calibration)
    _run(config, models["plain"], tmp_path / "b", calibration)
    assert _sha(tmp_path / "a") == _sha(tmp_path / "b")
    other = calibration_data(ner_sentences(24, offset=24))
    _run(config, models["plain"], tmp_path / "c", other)
    assert _sha(tmp_path / "c") != _sha(tmp_path / "a")  # the calibration data is really used


def _self_labelled_tune(folder, count=24):
    """Tune examples tagged with the fp32 model's own predictions: its F1 on them is 1.0, so any
    F1 the quantized model loses is quantization error, not noise of a random model."""
    from pipeline.data import TokenExample
    from pipeline.tasks import get_task

    words = [tuple(s.text.split()) for s in ner_sentences(count)]
    untagged = [TokenExample(w, ("O",) * len(w)) for w in words]
    task = get_task("token-classification")
    scorer = task.onnx_scorer(folder, untagged, max_length=64)
    scorer.score(folder / "model.onnx")
    return [TokenExample(w, tuple(tags)) for w, tags in zip(words, scorer.reference, strict=True)]


@pytest.fixture(scope="module")
def outlier_tune(models):
    tune = _self_labelled_tune(models["outlier"])
    assert any(tag != "O" for example in tune for tag in example.tags)  # entities to score
    return tune


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_auto_exclusion_keeps_nodes_in_float_until_f1_holds(
    models, calibration, outlier_tune, tmp_path, mode
):
    """The outlier model has one FFN output MatMul with a huge input channel: per-tensor INT8
    activations lose its other channels, and tune F1 drops. Worst-ranked first, nodes are kept in
    float one at a time, the model re-quantized and scored, until the drop is within the target:
    the outlier MatMul is the node that ends the search (dynamic ranks it first; static ranks the
    attention-probability MatMuls above it, whose exclusion does not help, and goes on)."""
    from pipeline.data import DataBundle

    data = DataBundle.from_examples(
        "token-classification", calibration=calibration.get("calibration"), tune=outlier_tune
    )
    plain = _run(QuantizeConfig(mode=mode), models["outlier"], tmp_path / "p", data)
    # the outlier costs F1 beyond the target below (0.035 on an AVX-512 VNNI CPU, ~0.05 on AVX2:
    # the INT8 kernels differ, reduce_range too)
    assert plain["tune"]["input"] == 1.0 and plain["tune"]["drop"] > 0.03

    config = QuantizeConfig(mode=mode, auto_exclude={"max_nodes": 4, "max_metric_drop": 0.03})
    metrics = _run(config, models["outlier"], tmp_path / "a", data)
    auto = metrics["auto_exclusion"]
    target = "/bert/encoder/layer.0/output/dense/MatMul"
    ranked = [row["node"] for row in auto["ranking"]]
    assert auto["target_met"] is True and auto["excluded"][-1] == target
    assert auto["excluded"] == ranked[: len(auto["excluded"])] == metrics["nodes_excluded"]
    if mode == "dynamic":
        assert auto["excluded"] == [target]
    steps = auto["steps"]
    assert [step["excluded"] for step in steps] == list(range(len(auto["excluded"]) + 1))
    assert steps[0]["drop"] == plain["tune"]["drop"]
    assert all(step["drop"] > 0.03 for step in steps[:-1]) and steps[-1]["drop"] <= 0.03
    assert metrics["tune"]["drop"] == steps[-1]["drop"]  # the shipped model is the one scored
    ops_key = "QuantizeLinear" if mode == "static" else "MatMulInteger"
    assert metrics["quantized_ops"][ops_key] < plain["quantized_ops"][ops_key]
    json.dumps(metrics)


def test_auto_exclusion_needs_a_tune_split(models, tmp_path):
    config = QuantizeConfig(mode="dynamic", auto_exclude={"max_nodes": 1})
    with pytest.raises(InputError, match="auto_exclude"):
        _run(config, models["plain"], tmp_path / "q")


def test_greedy_exclusion_stops_at_the_first_count_within_target(tmp_path):
    drops = {0: 0.3, 1: 0.2, 2: 0.04, 3: 0.0}
    seen = []

    def quantize_fn(path, _nodes, exclude):
        seen.append(list(exclude or []))
        path.write_bytes(b"x")
        return path

    chosen = greedy_exclusion(
        ["a", "b", "c", "d"],
        quantize_fn,
        score=lambda path: 1.0 - drops[int(path.stem.split("_")[1])],
        drop_of=lambda metric: 1.0 - metric,
        work=tmp_path,
        base_exclude=["keep"],
        max_nodes=4,
        max_drop=0.05,
    )
    assert chosen["excluded"] == ["a", "b"] and chosen["target_met"] is True
    assert seen == [["keep"], ["keep", "a"], ["keep", "a", "b"]]
    assert [s["node"] for s in chosen["steps"]] == [None, "a", "b"]
    assert not list(tmp_path.iterdir())  # every trial model removed
    over = greedy_exclusion(
        ["a", "b"],
        quantize_fn,
        lambda p: 0.0,
        lambda m: 1.0,
        tmp_path,
        base_exclude=[],
        max_nodes=1,
        max_drop=0.1,
    )
    assert over["target_met"] is False and over["excluded"] == ["a"] and len(over["steps"]) == 2


def test_input_ranges_rank_the_outlier_input_first(models, calibration):
    from pipeline.quantization.calibration import calibration_feeds

    source = models["outlier"] / "model.onnx"
    feeds = calibration_feeds(calibration.get("calibration")[:6], models["outlier"], source, 64, False)
    target = "/bert/encoder/layer.0/output/dense/MatMul"
    other = "/bert/encoder/layer.1/output/dense/MatMul"
    ranges = input_ranges(source, feeds, [target, other])
    assert ranges[target] > 1.2 * ranges[other] > 0


def test_nodes_to_exclude(models, tmp_path):
    metrics = _run(QuantizeConfig(nodes_to_exclude=["/classifier/MatMul"]), models["plain"], tmp_path / "q")
    assert metrics["quantized_ops"]["MatMulInteger"] == WEIGHT_MATMULS - 1
    with pytest.raises(InputError, match=r"nodes_to_exclude: 1 node\(s\) not in .*: /nope"):
        _run(QuantizeConfig(nodes_to_exclude=["/nope"]), models["plain"], tmp_path / "r")


def test_weight_only_int4(models, tmp_path):
    metrics = _run(QuantizeConfig(mode="weight_only_int4", block_size=16), models["plain"], tmp_path / "q")
    assert metrics["quantized_ops"]["MatMulNBits"] == WEIGHT_MATMULS
    assert metrics["settings"]["block_size"] == 16
    _runs(tmp_path / "q")


def test_weight_only_int8_gets_int8_activations_by_default(models, tmp_path):
    """8-bit MatMulNBits with accuracy_level 4 (int8 activations per block at run time): the
    fast CPU path; an explicit accuracy_level wins."""
    import onnx

    metrics = _run(QuantizeConfig(mode="weight_only_int8"), models["plain"], tmp_path / "q")
    assert metrics["quantized_ops"]["MatMulNBits"] == WEIGHT_MATMULS
    assert metrics["settings"]["bits"] == 8 and metrics["settings"]["accuracy_level"] == 4
    nodes = [
        n for n in onnx.load(str(tmp_path / "q" / "model.onnx")).graph.node if n.op_type == "MatMulNBits"
    ]
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in nodes[0].attribute}
    assert attributes["bits"] == 8 and attributes["accuracy_level"] == 4
    assert metrics["parity"]["argmax_agreement"] > 0.95  # 8-bit weights: close to fp32
    _runs(tmp_path / "q")
    explicit = _run(
        QuantizeConfig(mode="weight_only_int8", accuracy_level=1), models["plain"], tmp_path / "r"
    )
    assert explicit["settings"]["accuracy_level"] == 1
    with pytest.raises(ValidationError, match="int4_algorithm does not apply to mode weight_only_int8"):
        QuantizeConfig(mode="weight_only_int8", int4_algorithm="hqq")


def test_empty_calibration_data_is_an_input_error(models, tmp_path):
    with pytest.raises(InputError, match="data.calibration"):
        _run(QuantizeConfig(mode="static"), models["plain"], tmp_path / "a", calibration_data([]))
    blank = calibration_data([TextExample("  "), TextExample("")])
    with pytest.raises(InputError, match="data.calibration: all 2 calibration examples have empty text"):
        _run(QuantizeConfig(mode="static"), models["plain"], tmp_path / "b", blank)
    assert not (tmp_path / "b" / "model.onnx").exists()


def test_parity_limits_fail_the_stage(models, calibration, tmp_path):
    with pytest.raises(ParityError, match="exceeds atol"):
        _run(QuantizeConfig(parity_atol=1e-6), models["plain"], tmp_path / "a")
    with pytest.raises(ParityError, match="argmax agreement .* below the minimum 1"):
        _run(
            QuantizeConfig(mode="static", min_argmax_agreement=1.0),
            models["outlier"],
            tmp_path / "b",
            calibration,
        )


def test_config_rejects_fields_of_other_modes():
    with pytest.raises(ValidationError, match="calibration does not apply to mode dynamic"):
        QuantizeConfig(mode="dynamic", calibration="Entropy")
    with pytest.raises(ValidationError, match="block_size does not apply to mode static"):
        QuantizeConfig(mode="static", block_size=64)
    with pytest.raises(ValidationError, match="power of two"):
        QuantizeConfig(mode="weight_only_int4", block_size=48)
    with pytest.raises(ValidationError):
        QuantizeConfig(mode="static", format="QDQQ")
    # Defaults round-trip (the runner re-validates the dumped config).
    for mode in ("dynamic", "static", "weight_only_int4"):
        dumped = QuantizeConfig(mode=mode).model_dump(mode="json")
        assert QuantizeConfig.model_validate(dumped).mode == mode


def test_int8_type_defaults_follow_the_cpu():
    vnni, plain, arm = (default_int8_types(_machine(m)) for m in (VNNI, NO_VNNI, ARM))
    assert (vnni["activation_type"], vnni["weight_type"], vnni["reduce_range"]) == ("QUInt8", "QInt8", False)
    assert (plain["activation_type"], plain["reduce_range"]) == ("QUInt8", True)
    assert (arm["activation_type"], arm["reduce_range"]) == ("QInt8", False)


def test_no_vnni_machine_gets_reduce_range(models, tmp_path):
    metrics = _run(QuantizeConfig(), models["plain"], tmp_path / "q", machine=NO_VNNI)
    assert metrics["settings"]["reduce_range"] is True
    assert "without VNNI" in metrics["settings"]["type_defaults"]["reason"]


def test_fidelity_is_reported_and_enforced_only_where_the_recipe_sets_a_floor(models, tmp_path):
    """Random-input parity reports max |diff|, argmax agreement and cosine; floors are opt-in (a
    lossy step is judged by the task metric on real data), and fail the stage when set."""
    metrics = _run(QuantizeConfig(mode="dynamic"), models["plain"], tmp_path / "ok")
    parity = metrics["parity"]
    assert 0.9 < parity["cosine_mean"] <= 1.0 and parity["cosine_min"] <= parity["cosine_mean"]
    assert 0 < parity["argmax_agreement"] <= 1.0 and parity["max_abs_diff"] > 0
    with pytest.raises(ParityError, match="mean output cosine similarity .* below the minimum 1"):
        quantize(
            make_ctx(
                QuantizeConfig(min_cosine_mean=1.0),
                models["plain"],
                tmp_path / "b",
                task="feature-extraction",
            )
        )


def test_hqq_takes_an_accuracy_level():
    # Its float zero points are rewritten into integer ones, so the int8-compute kernel applies.
    assert QuantizeConfig(mode="weight_only_int4", int4_algorithm="hqq", accuracy_level=4).accuracy_level == 4


@pytest.mark.parametrize(
    "activation_type,weight_type,per_channel",
    [("QUInt8", "QInt8", True), ("QInt8", "QInt8", False), ("QUInt8", "QUInt8", True)],
)
def test_folded_qdq_computes_what_the_plain_qdq_graph_does(
    models, calibration, tmp_path, activation_type, weight_type, per_channel
):
    """fold_qdq keeps every MatMul's int8 inputs, scales and zero points; only float readers lose a
    rounding step, so its logits stay next to the plain QDQ graph's and no further from fp32."""
    import onnx

    from pipeline.quantization.qdq import fold_qdq

    config = QuantizeConfig(
        mode="static",
        integer_ops=False,
        activation_type=activation_type,
        weight_type=weight_type,
        per_channel=per_channel,
    )
    _run(config, models["plain"], tmp_path / "q", calibration, VNNI)
    model = onnx.load(str(tmp_path / "q" / "model.onnx"))
    changes = fold_qdq(model)
    assert changes["matmuls_to_integer_ops"] == changes["biases_folded"] == WEIGHT_MATMULS
    onnx.checker.check_model(model)
    onnx.save(model, str(tmp_path / "folded.onnx"))

    sessions = {
        name: open_session(path)
        for name, path in [
            ("fp32", models["plain"] / "model.onnx"),
            ("qdq", tmp_path / "q" / "model.onnx"),
            ("folded", tmp_path / "folded.onnx"),
        ]
    }
    names = [i.name for i in sessions["fp32"].get_inputs()]
    feeds = dummy_inputs(names, 4, 16, 30522)
    logits = {name: session.run(None, feeds)[0] for name, session in sessions.items()}
    scale = np.abs(logits["fp32"]).max()
    assert np.abs(logits["folded"] - logits["qdq"]).max() < 0.05 * scale
    error = {name: np.abs(logits[name] - logits["fp32"]).mean() for name in ("qdq", "folded")}
    assert error["folded"] <= error["qdq"] * 1.05


def test_fold_leaves_a_graph_without_weight_matmuls_alone():
    from onnx import TensorProto, helper

    from pipeline.quantization.qdq import fold_qdq

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["y"])],
        "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 2]) for n in ("a", "b")],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])],
    )
    model = helper.make_model(graph)
    assert fold_qdq(model) == {
        "matmuls_to_integer_ops": 0,
        "biases_folded": 0,
        "float_readers_rewired": 0,
        "duplicate_qdq_merged": 0,
    }
    assert [n.op_type for n in model.graph.node] == ["MatMul"]
    assert [o.domain for o in model.opset_import] == [""]


def test_quantized_matmul_outputs_still_fold_their_bias(models, calibration, tmp_path):
    """With ORT's output quantization the bias Add reads DQ(Q(MatMul)); rewired to the float output
    first, the dead pair goes and the Add folds into MatMulIntegerToFloat like the plain case."""
    config = QuantizeConfig(mode="static", quantize_matmul_outputs=True)
    metrics = _run(config, models["plain"], tmp_path / "q", calibration, VNNI)
    folded = metrics["settings"]["integer_ops"]
    assert folded["matmuls_to_integer_ops"] == folded["biases_folded"] == WEIGHT_MATMULS
    assert metrics["quantized_ops"]["MatMulIntegerToFloat"] == WEIGHT_MATMULS
    _runs(tmp_path / "q")


@pytest.mark.parametrize("excluded_as", ["float", "dynamic"])
def test_static_excluded_nodes_run_as_float_or_dynamic_int8(models, calibration, tmp_path, excluded_as):
    excluded = ["/classifier/MatMul", "/bert/encoder/layer.0/output/dense/MatMul"]
    config = QuantizeConfig(mode="static", nodes_to_exclude=excluded, excluded_as=excluded_as)
    metrics = _run(config, models["plain"], tmp_path / "q", calibration, VNNI)
    ops = metrics["quantized_ops"]
    assert metrics["nodes_excluded"] == excluded
    assert ops["MatMulIntegerToFloat"] == WEIGHT_MATMULS - 2
    if excluded_as == "dynamic":
        assert ops["MatMulInteger"] == ops["DynamicQuantizeLinear"] == 2 and ops["MatMul"] == 4
    else:
        assert ops["MatMulInteger"] == 0 and ops["MatMul"] == 4 + 2
    assert metrics["parity"]["argmax_agreement"] >= 0.9
    assert sorted(p.name for p in (tmp_path / "q").glob("*.onnx*")) == ["model.onnx"]
    _runs(tmp_path / "q")


def test_excluded_as_belongs_to_static():
    with pytest.raises(ValidationError, match="excluded_as"):
        QuantizeConfig(mode="dynamic", excluded_as="dynamic")
