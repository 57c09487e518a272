"""Decoder quantization: INT8 dynamic and INT4 weight-only models load, generate, and handle the
LM head and embedding as asked."""

from __future__ import annotations

import numpy as np
import pytest
from fixtures_decoder import tiny_decoder

from pipeline.errors import InputError

PARITY = {"prompt_lens": [6], "past_lens": [5]}


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    return tiny_decoder(tmp_path_factory, "gpt2")


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return tiny_decoder(tmp_path_factory, "llama")


def _generate(folder, steps=6):
    from pipeline.decoder.generate import OnnxGreedyGenerator
    from pipeline.onnx_utils import open_session

    tokens = OnnxGreedyGenerator(open_session(folder / "model.onnx")).generate(
        np.array([[5, 17, 99, 4]]), steps
    )
    assert tokens.shape == (1, steps) and ((tokens >= 0) & (tokens < 1000)).all()
    return tokens


@pytest.mark.parametrize("algo,block", [("rtn", 32), ("hqq", 128)])
def test_int4_model_loads_and_generates(gpt2, tmp_path, algo, block):
    from pipeline.decoder.quantize import quantize_decoder

    _, onnx_dir = gpt2
    metrics = quantize_decoder(onnx_dir, tmp_path / "q", "int4", block, algo, True, parity=PARITY)
    ops = metrics["quantized_ops"]
    # 4 linear layers x 2 blocks + the (untied) LM head; attention MatMuls (activations) stay float.
    assert ops["MatMulNBits"] == 9 and ops["Gemm"] == 0
    head = metrics["lm_head"]
    assert head["tied_in_export"] and head["quantized"] and head["untied_for_quantization"]
    assert metrics["settings"]["algorithm"] == algo and metrics["settings"]["block_size"] == block
    assert metrics["random_weights"] is True
    assert 0 <= metrics["parity_vs_fp32"]["argmax_agreement"] <= 1
    assert (tmp_path / "q" / "tokenizer.json").is_file()
    _generate(tmp_path / "q")


def test_int8_model_loads_and_generates(llama, tmp_path):
    from pipeline.decoder.quantize import quantize_decoder

    _, onnx_dir = llama
    metrics = quantize_decoder(onnx_dir, tmp_path / "q", "int8", quantize_lm_head=True, parity=PARITY)
    # 7 projections per layer x 2 layers + LM head.
    assert metrics["quantized_ops"]["MatMulInteger"] == 15
    assert metrics["settings"]["weight_type"] == "QInt8" and metrics["settings"]["per_channel"] is True
    assert metrics["size_ratio"] < 0.85
    assert metrics["parity_vs_fp32"]["argmax_agreement"] > 0.5
    _generate(tmp_path / "q")


def test_lm_head_kept_fp32_when_asked(gpt2, tmp_path):
    import onnx

    from pipeline.decoder.graph import lm_head_node
    from pipeline.decoder.quantize import quantize_decoder

    _, onnx_dir = gpt2
    metrics = quantize_decoder(onnx_dir, tmp_path / "q", "int4", 32, "rtn", False, parity=PARITY)
    assert metrics["quantized_ops"]["MatMulNBits"] == 8
    assert metrics["lm_head"]["quantized"] is False and metrics["settings"]["nodes_excluded"]
    head = lm_head_node(onnx.load(str(tmp_path / "q" / "model.onnx")))
    assert head.op_type == "MatMul"
    _generate(tmp_path / "q")


def test_embedding_quantized_when_asked(llama, tmp_path):
    from pipeline.decoder.quantize import quantize_decoder

    _, onnx_dir = llama
    metrics = quantize_decoder(
        onnx_dir, tmp_path / "q", "int4", 32, "rtn", True, quantize_embedding=True, parity=PARITY
    )
    assert metrics["quantized_ops"]["GatherBlockQuantized"] == 1
    assert metrics["embedding"]["quantized"] is True
    _generate(tmp_path / "q")


def test_quantize_errors_are_clear(gpt2, tmp_path):
    from pipeline.decoder.quantize import quantize_decoder
    from pipeline.errors import ParityError

    _, onnx_dir = gpt2
    with pytest.raises(InputError, match="block_size must be a power of two"):
        quantize_decoder(onnx_dir, tmp_path / "a", "int4", 48)
    with pytest.raises(InputError, match="HQQ cannot quantize the embedding"):
        quantize_decoder(onnx_dir, tmp_path / "b", "int4", 32, "hqq", quantize_embedding=True)
    with pytest.raises(InputError, match="mode must be int8 or int4"):
        quantize_decoder(onnx_dir, tmp_path / "c", "int2")
    with pytest.raises(InputError, match="no model.onnx"):
        quantize_decoder(tmp_path, tmp_path / "d", "int8")
    with pytest.raises(ParityError, match="argmax agreement .* below the minimum"):
        quantize_decoder(onnx_dir, tmp_path / "e", "int4", 128, parity=PARITY, min_argmax_agreement=1.01)
