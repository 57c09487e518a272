"""Decoder quantization: INT8 dynamic and INT4 weight-only models load, generate, and handle the
LM head and embedding as asked."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import run_decoder_stage, tiny_decoder
from pydantic import ValidationError


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    return tiny_decoder(tmp_path_factory, "gpt2")


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return tiny_decoder(tmp_path_factory, "llama")


def _generate(folder, steps=6):
    from pipeline.onnx.session import open_session
    from pipeline.tasks.text_generation.generate import OnnxGreedyGenerator

    tokens = OnnxGreedyGenerator(open_session(folder / "model.onnx")).generate(
        np.array([[5, 17, 99, 4]]), steps
    )
    assert tokens.shape == (1, steps) and ((tokens >= 0) & (tokens < 1000)).all()
    return tokens


@pytest.mark.parametrize("algo,block", [("rtn", 32), ("hqq", 128)])
def test_int4_model_loads_and_generates(gpt2, tmp_path, algo, block):
    _, onnx_dir = gpt2
    config = {
        "mode": "weight_only_int4",
        "block_size": block,
        "int4_algorithm": algo,
        "quantize_lm_head": True,
    }
    metrics = run_decoder_stage("quantize", config, onnx_dir, tmp_path / "q")
    ops = metrics["quantized_ops"]
    # 4 linear layers x 2 blocks + the (untied) LM head; attention MatMuls (activations) stay float.
    assert ops["MatMulNBits"] == 9 and ops["Gemm"] == 0
    head = metrics["lm_head"]
    assert head["tied_in_export"] and head["quantized"] and head["untied_for_quantization"]
    assert metrics["settings"]["algorithm"] == algo and metrics["settings"]["block_size"] == block
    assert metrics["random_weights"] is True
    assert 0 <= metrics["parity"]["argmax_agreement"] <= 1
    assert (tmp_path / "q" / "tokenizer.json").is_file()
    _generate(tmp_path / "q")


def test_int8_model_loads_and_generates(llama, tmp_path):
    _, onnx_dir = llama
    metrics = run_decoder_stage(
        "quantize", {"mode": "dynamic", "quantize_lm_head": True}, onnx_dir, tmp_path / "q"
    )
    # 7 projections per layer x 2 layers + LM head.
    assert metrics["quantized_ops"]["MatMulInteger"] == 15
    assert metrics["settings"]["weight_type"] == "QInt8" and metrics["settings"]["per_channel"] is True
    assert metrics["size_ratio"] < 0.85
    assert metrics["parity"]["argmax_agreement"] > 0.5
    _generate(tmp_path / "q")


def test_lm_head_kept_fp32_when_asked(gpt2, tmp_path):
    import onnx

    from pipeline.tasks.text_generation.graph import lm_head_node

    _, onnx_dir = gpt2
    metrics = run_decoder_stage(
        "quantize", {"mode": "weight_only_int4", "block_size": 32}, onnx_dir, tmp_path / "q"
    )
    assert metrics["quantized_ops"]["MatMulNBits"] == 8
    assert metrics["lm_head"]["quantized"] is False and metrics["settings"]["nodes_excluded"]
    head = lm_head_node(onnx.load(str(tmp_path / "q" / "model.onnx")))
    assert head.op_type == "MatMul"
    _generate(tmp_path / "q")


def test_embedding_quantized_when_asked(llama, tmp_path):
    _, onnx_dir = llama
    config = {"mode": "weight_only_int4", "quantize_lm_head": True, "quantize_embedding": True}
    metrics = run_decoder_stage("quantize", config, onnx_dir, tmp_path / "q")
    assert metrics["quantized_ops"]["GatherBlockQuantized"] == 1
    assert metrics["embedding"]["quantized"] is True
    _generate(tmp_path / "q")


def test_quantize_errors_are_clear(gpt2, tmp_path):
    from pipeline.config import QuantizeConfig, recipe_from_dict
    from pipeline.errors import InputError, ParityError, RecipeError

    _, onnx_dir = gpt2
    with pytest.raises(ValidationError, match="block_size must be a power of two"):
        QuantizeConfig(mode="weight_only_int4", block_size=48)
    with pytest.raises(ValidationError, match="HQQ cannot quantize the embedding"):
        QuantizeConfig(mode="weight_only_int4", int4_algorithm="hqq", quantize_embedding=True)
    with pytest.raises(ValidationError, match="mode"):
        QuantizeConfig(mode="int2")
    with pytest.raises(InputError, match="no model.onnx"):
        run_decoder_stage("quantize", {"mode": "dynamic"}, tmp_path, tmp_path / "d")
    with pytest.raises(ParityError, match="argmax agreement .* below the minimum"):
        config = {"mode": "weight_only_int4", "block_size": 128, "min_argmax_agreement": 1.0}
        run_decoder_stage("quantize", config, onnx_dir, tmp_path / "e")
    # Options that do not apply to decoders are refused when the recipe is read.
    document = {"name": "d", "model": {"source": "x", "task": "text-generation"}}
    for step, message in (
        ({"mode": "static"}, "mode: static is not supported for text-generation"),
        ({"mode": "dynamic", "auto_exclude": {}}, "auto_exclude: not supported for text-generation"),
    ):
        with pytest.raises(RecipeError, match=message):
            recipe_from_dict({**document, "variants": {"q": [{"quantize": step}]}})
    with pytest.raises(RecipeError, match="quantize_lm_head: applies to text-generation models only"):
        recipe_from_dict(
            {
                "name": "e",
                "model": {"source": "x", "task": "token-classification"},
                "variants": {"q": [{"quantize": {"quantize_lm_head": True}}]},
            }
        )


def test_hqq_float_zero_points_become_integer_ones_exactly(llama, tmp_path):
    import onnx
    from onnx import TensorProto
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        HQQWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    from pipeline.onnx.session import open_session
    from pipeline.quantization.nbits import integer_zero_points

    _, onnx_dir = llama
    quantizer = MatMulNBitsQuantizer(
        onnx.load(str(onnx_dir / "model.onnx")),
        algo_config=HQQWeightOnlyQuantConfig(block_size=32, bits=4),
    )
    quantizer.process()
    hqq = quantizer.model.model
    onnx.save(hqq, str(tmp_path / "float_zero_points.onnx"))
    nbits = [n for n in hqq.graph.node if n.op_type == "MatMulNBits"]
    inputs = {n.input[0] for n in nbits}
    matmuls_before = sum(n.op_type == "MatMul" for n in hqq.graph.node)

    assert integer_zero_points(hqq, accuracy_level=None) == len(nbits) > 0
    initializers = {i.name: i for i in hqq.graph.initializer}
    assert all(initializers[n.input[3]].data_type == TensorProto.UINT8 for n in nbits)
    # One block sum per distinct input (q/k/v share theirs), one correction per node.
    assert sum(n.op_type == "MatMul" for n in hqq.graph.node) == matmuls_before + len(inputs) + len(nbits)
    onnx.checker.check_model(hqq)
    onnx.save(hqq, str(tmp_path / "integer_zero_points.onnx"))

    feeds = {"input_ids": np.array([[5, 17, 99, 4, 250, 7]]), "attention_mask": np.ones((1, 6), np.int64)}
    reference, rewritten = (
        open_session(tmp_path / f) for f in ("float_zero_points.onnx", "integer_zero_points.onnx")
    )
    names = {i.name for i in reference.get_inputs()}
    if "position_ids" in names:
        feeds["position_ids"] = np.arange(6)[None]
    for i in reference.get_inputs():
        if i.name.startswith("past"):
            feeds[i.name] = np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32)
    expected = reference.run(["logits"], feeds)[0]
    got = rewritten.run(["logits"], feeds)[0]
    assert np.abs(got - expected).max() < 1e-4 * max(1.0, np.abs(expected).max())
    assert integer_zero_points(hqq, accuracy_level=None) == 0  # nothing left to rewrite


def test_hqq_stage_runs_on_the_int8_kernel(llama, tmp_path):
    import onnx
    from onnx import helper

    _, onnx_dir = llama
    config = {"mode": "weight_only_int4", "int4_algorithm": "hqq", "block_size": 32, "accuracy_level": 4}
    metrics = run_decoder_stage("quantize", config, onnx_dir, tmp_path / "q")
    assert metrics["settings"]["float_zero_points_rewritten"] == metrics["quantized_ops"]["MatMulNBits"] == 14
    nodes = [
        n for n in onnx.load(str(tmp_path / "q" / "model.onnx")).graph.node if n.op_type == "MatMulNBits"
    ]
    assert all(
        {a.name: helper.get_attribute_value(a) for a in n.attribute}.get("accuracy_level") == 4 for n in nodes
    )
    assert np.isfinite(metrics["parity"]["max_abs_diff"])  # random weights: no quality to judge
    _generate(tmp_path / "q")


def test_lm_head_gets_its_own_bits(llama, tmp_path):
    import onnx
    from onnx import helper

    from pipeline.config import QuantizeConfig
    from pipeline.tasks.text_generation.graph import lm_head_node

    _, onnx_dir = llama
    config = {
        "mode": "weight_only_int4",
        "int4_algorithm": "hqq",
        "accuracy_level": 4,
        "quantize_lm_head": True,
        "lm_head_bits": 8,
    }
    metrics = run_decoder_stage("quantize", config, onnx_dir, tmp_path / "q")
    model = onnx.load(str(tmp_path / "q" / "model.onnx"))
    bits = {
        n.name: {a.name: helper.get_attribute_value(a) for a in n.attribute}["bits"]
        for n in model.graph.node
        if n.op_type == "MatMulNBits"
    }
    head = lm_head_node(model)
    assert head.op_type == "MatMulNBits" and bits.pop(head.name) == 8
    assert len(bits) == 14 and set(bits.values()) == {4}
    assert metrics["settings"]["lm_head_bits"] == 8 and metrics["lm_head"]["quantized"]
    _generate(tmp_path / "q")
    with pytest.raises(ValidationError, match="lm_head_bits needs quantize_lm_head"):
        QuantizeConfig(mode="weight_only_int4", lm_head_bits=8)
    with pytest.raises(ValidationError, match="lm_head_bits does not apply to mode dynamic"):
        QuantizeConfig(mode="dynamic", quantize_lm_head=True, lm_head_bits=8)
