"""make gpu-check: its verdict logic on CPU, and the clear "no GPU" line on a machine without one."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import ROOT

from pipeline.gpu_check import agreement, failures, placement_verdict, table
from pipeline.onnx.session import provider_availability

CUDA_OK = {"CUDAExecutionProvider": {"nodes": 40, "ops": {"MatMul": 30, "Add": 10}}}
SHAPES_ON_CPU = {**CUDA_OK, "CPUExecutionProvider": {"nodes": 3, "ops": {"Shape": 2, "Gather": 1}}}
FELL_BACK = {**CUDA_OK, "CPUExecutionProvider": {"nodes": 5, "ops": {"Shape": 1, "MatMulInteger": 4}}}


def _row(variant, placement="ok", cpu_nodes=0, agree=1.0):
    return {
        "variant": variant,
        "placement": placement,
        "cpu_nodes": cpu_nodes,
        "agreement": agree,
        "max_abs_diff": 0.01,
        "cuda_p50_ms": 1.0,
        "cpu_p50_ms": 9.0,
    }


def test_placement_fails_float_variants_that_fall_back_and_reports_int8_as_partial():
    assert placement_verdict(CUDA_OK, quantized=False) == ("ok", 0)
    assert placement_verdict(SHAPES_ON_CPU, quantized=False) == ("ok", 0)  # shape ops only
    assert placement_verdict(FELL_BACK, quantized=False) == ("FALLBACK", 4)
    assert placement_verdict(FELL_BACK, quantized=True) == ("partial", 4)


def test_failures_name_the_variant_and_the_reason():
    rows = [_row("fp32"), _row("fused", "FALLBACK", 4), _row("int8", "partial", 9, 0.9)]
    assert failures(rows) == [
        "fused: 4 compute node(s) fell back to CPU",
        "int8: argmax agreement 0.900 < 0.98",
    ]
    assert failures([_row("fp32"), _row("int8", "partial", 9)]) == []
    text = table(rows)
    assert text.splitlines()[0].startswith("| variant") and "FALLBACK" in text and len(text.splitlines()) == 5


def test_agreement_against_the_fp32_reference():
    ref = np.array([[[0.1, 0.9], [0.8, 0.2]]])
    assert agreement(ref, ref) == (1.0, 0.0)
    same, diff = agreement(ref, ref[..., ::-1])
    assert same == 0.0 and diff == pytest.approx(0.8)


@pytest.mark.skipif(provider_availability("CUDAExecutionProvider")[0], reason="a GPU is present")
def test_without_a_gpu_it_says_so_and_checks_nothing(capsys):
    from pipeline.cli import main

    assert (
        main(["gpu-check", str(ROOT / "recipes" / "minilm-ner-wnut16.yaml"), "--exported", "/nonexistent"])
        == 0
    )
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("gpu-check: no GPU (") and out[0].endswith("nothing checked")
