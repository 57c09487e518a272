"""The quantize stage on tiny BERTs: dynamic/static/INT4 op counts, calibration, auto-exclusion."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from helpers import calibration_data, export_onnx, make_ctx, ner_sentences, tiny_model
from pydantic import ValidationError

from pipeline.config import OptimizeConfig, QuantizeConfig
from pipeline.data import TextExample
from pipeline.errors import InputError, ParityError
from pipeline.onnx.session import open_session
from pipeline.quantization.sensitivity import output_error
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
    plain = export_onnx(tiny_model(root / "hf", labels=5, classifier_scale=20.0), root / "onnx")
    optimize(make_ctx(OptimizeConfig(), plain, root / "fused"))
    hf_outlier = tiny_model(root / "hf-outlier", labels=5, classifier_scale=20.0, outlier_layer=0)
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


@pytest.mark.parametrize("fmt", ["QDQ", "QOperator"])
def test_static_quantizes_matmuls_only(models, calibration, tmp_path, fmt):
    metrics = _run(
        QuantizeConfig(mode="static", format=fmt), models["plain"], tmp_path / "q", calibration, VNNI
    )
    ops, settings = metrics["quantized_ops"], metrics["settings"]
    assert settings["activation_type"] == "QUInt8" and settings["weight_type"] == "QInt8"
    assert settings["op_types"] == ["MatMul", "Gemm"] and settings["calibration_examples"] == 24
    assert ops["MatMulInteger"] == 0
    if fmt == "QDQ":
        assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] >= WEIGHT_MATMULS
        assert ops["MatMul"] == WEIGHT_MATMULS + 4  # kept, with Q/DQ around them
    else:
        assert ops["QLinearMatMul"] == WEIGHT_MATMULS + 4 and ops["MatMul"] == 0
    assert metrics["parity"]["argmax_agreement"] >= 0.9
    _runs(tmp_path / "q")


@pytest.mark.parametrize("method", ["Entropy", "Percentile"])
def test_static_on_fused_model_with_histogram_calibration(models, calibration, tmp_path, method):
    """Fused graphs need symbolic shape inference, or the calibrator silently skips tensors;
    histogram methods need one example per collection (examples differ in length)."""
    metrics = _run(
        QuantizeConfig(mode="static", calibration=method), models["fused"], tmp_path / "q", calibration
    )
    ops = metrics["quantized_ops"]
    assert ops["QuantizeLinear"] > 0 and ops["MatMul"] == WEIGHT_MATMULS - 6  # Q/K/V inside Attention
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


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_auto_exclusion_finds_the_outlier_matmul(models, calibration, tmp_path, mode):
    """The outlier model has one FFN output MatMul with a huge input channel: per-tensor INT8
    activations lose its other channels. Automatic exclusion must find it and improve parity."""
    plain = _run(
        QuantizeConfig(mode=mode, min_argmax_agreement=0.5), models["outlier"], tmp_path / "p", calibration
    )
    config = QuantizeConfig(mode=mode, min_argmax_agreement=0.5, auto_exclude={"max_nodes": 1, "samples": 12})
    metrics = _run(config, models["outlier"], tmp_path / "a", calibration)

    auto = metrics["auto_exclusion"]
    target = "/bert/encoder/layer.0/output/dense/MatMul"
    assert auto["excluded"] == [target] == metrics["nodes_excluded"]
    assert auto["ranking"][0]["node"] == target
    assert auto["after"]["sqnr_db"] > auto["before"]["sqnr_db"] + 3  # measured gain, recorded
    assert metrics["parity"]["max_abs_diff"] < plain["parity"]["max_abs_diff"]
    ops_key = "QuantizeLinear" if mode == "static" else "MatMulInteger"
    assert metrics["quantized_ops"][ops_key] < plain["quantized_ops"][ops_key]
    json.dumps(metrics)


def test_auto_exclusion_stops_at_target(models, calibration, tmp_path):
    config = QuantizeConfig(mode="dynamic", auto_exclude={"max_nodes": 3, "samples": 8, "min_sqnr_db": 0.0})
    metrics = _run(config, models["plain"], tmp_path / "q", calibration)
    assert metrics["auto_exclusion"]["excluded"] == [] and metrics["auto_exclusion"]["target_met"] is True
    assert metrics["quantized_ops"]["MatMulInteger"] == WEIGHT_MATMULS


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


def test_output_error_figures():
    ref = [[np.array([[1.0, 2.0, 3.0]], dtype=np.float32)]]
    assert output_error(ref, ref)["sqnr_db"] == 200.0
    noisy = [[np.array([[1.0, 2.0, 2.9]], dtype=np.float32)]]
    error = output_error(ref, noisy)
    assert error["argmax_agreement"] == 1.0 and abs(error["max_abs_diff"] - 0.1) < 1e-6
    assert 30 < error["sqnr_db"] < 32  # 10*log10(14 / 0.01)
    flipped = [[np.array([[1.0, 3.5, 3.0]], dtype=np.float32)]]
    assert output_error(ref, flipped)["argmax_agreement"] == 0.0


def test_fidelity_check_follows_the_task(models, tmp_path):
    """Class scores: argmax agreement (default 0.9). Hidden states (feature-extraction): mean cosine
    (default 0.98), since the argmax of an embedding is no prediction."""
    from pipeline.tasks import get_task

    def policy(task):
        return get_task(task).quantization_policy(None, QuantizeConfig())

    assert policy("token-classification").min_argmax_agreement == 0.9
    assert policy("feature-extraction").min_argmax_agreement is None
    assert policy("feature-extraction").min_cosine_mean == 0.98
    assert policy("text-classification").min_cosine_mean is None

    metrics = _run(QuantizeConfig(mode="dynamic"), models["plain"], tmp_path / "ok")
    parity = metrics["parity"]
    assert 0.9 < parity["cosine_mean"] <= 1.0 and parity["cosine_min"] <= parity["cosine_mean"]
    with pytest.raises(ParityError, match="mean output cosine similarity .* below the minimum 1"):
        quantize(
            make_ctx(
                QuantizeConfig(min_cosine_mean=1.0),
                models["plain"],
                tmp_path / "b",
                task="feature-extraction",
            )
        )
