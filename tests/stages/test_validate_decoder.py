"""Validation, report and release of a decoder (text-generation): perplexity is lower-is-better."""

from __future__ import annotations

import re

import pytest
from helpers import held_out_texts, run_readme_snippet, tiny_decoder, validate_into

from pipeline.config import recipe_from_dict
from pipeline.data import DataBundle, TextExample


@pytest.fixture(scope="module")
def decoder_run(tmp_path_factory):
    hf, onnx_dir = tiny_decoder(tmp_path_factory, "gpt2")
    recipe = recipe_from_dict(
        {
            "name": "tiny-decoder",
            "model": {"source": str(hf), "task": "text-generation", "max_length": 64},
            "variants": {"fp32": []},
            "validate": {
                "metric": "perplexity",
                # The report and the release are under test, not the machine's quietness: a busy
                # test machine must not make the speed gate inconclusive.
                "latency": {
                    "batch_sizes": [1],
                    "seq_lens": [8, 16],
                    "prefill_seq_lens": [8],  # a decode step at both, the prefill at 8 only
                    "warmup": 0,
                    "iters": 4,
                    "prefill_iters": 2,  # spread over the decode step's two turns of 2
                    "block": 2,
                    "threads": 1,
                    "max_other_cpu": 64.0,
                    "max_turn_spread": 1000.0,
                },
            },
            "gates": {"max_metric_drop": 0.5, "min_speedup_vs_pytorch": 0.01},
        }
    )
    data = DataBundle.from_examples("text-generation", eval=[TextExample(t) for t in held_out_texts(2)])
    out = tmp_path_factory.mktemp("decoder") / "report"
    report = validate_into(recipe, {"fp32": onnx_dir}, hf, data, {"fp32": []}, out)
    return {"recipe": recipe, "report": report, "out": out, "onnx": onnx_dir}


def test_decoder_report(decoder_run):
    report = decoder_run["report"]
    assert report["metric_name"] == "perplexity" and report["metric_higher_is_better"] is False
    fp32 = report["variants"]["fp32"]
    assert fp32["metric"] == pytest.approx(report["baseline"]["metric"], rel=1e-4)
    assert abs(fp32["metric_drop"]) < 1e-2 * report["baseline"]["metric"]
    assert fp32["agreement"] == 1.0  # greedy tokens identical to transformers' generate()
    assert (
        set(fp32["latency"]) == {"b1_s8", "b1_s16"}
        and fp32["latency"]["b1_s8"]["p99_ms"] >= fp32["latency"]["b1_s8"]["p50_ms"]
    )
    assert fp32["latency"]["b1_s8"]["prefill_ms_p50"] > 0
    assert fp32["latency"]["b1_s8"]["iters"] == 4 and fp32["latency"]["b1_s8"]["prefill_iters"] == 2
    assert fp32["latency"]["b1_s16"]["prefill_ms_p50"] is None and fp32["latency"]["b1_s16"]["p50_ms"] > 0
    assert set(fp32["prefill_speedup_vs_pytorch"]) == {"b1_s8"}
    assert fp32["speedup_vs_pytorch"]["b1_s8"] > 0
    assert report["release"]["variant"] == "fp32"
    assert any("random weights" in note for note in report["notes"])
    markdown = (decoder_run["out"] / "report.md").read_text()
    assert "| fp32 (released) |" in re.sub(" +", " ", markdown)
    assert "4 timed runs per shape (2 of the prefill), interleaved" in markdown


def test_decoder_release_verifies(decoder_run, tmp_path):
    from pipeline.release import build_release, verify_release
    from pipeline.tasks import get_task

    report, recipe = decoder_run["report"], decoder_run["recipe"]
    manifest = build_release(
        report,
        {"fp32": decoder_run["onnx"]},
        {"fp32": []},
        tmp_path / "release",
        model=recipe.model,
        task=get_task(recipe.model.task),
    )
    assert manifest["task"] == "text-generation" and manifest["labels"] is None
    assert any(i["name"].startswith("past_key_values") for i in manifest["model"]["inputs"])
    assert verify_release(tmp_path / "release") == []
    result = run_readme_snippet(tmp_path / "release", tmp_path)
    assert result.returncode == 0 and result.stdout.strip(), result.stderr[-2000:]


def test_prefill_seq_lens_must_be_timed_shapes_of_a_decoder():
    from pipeline.errors import RecipeError

    def recipe(task, latency):
        return {
            "name": "p",
            "model": {"source": "x", "task": task},
            "variants": {"fp32": []},
            "validate": {"latency": latency},
        }

    with pytest.raises(RecipeError, match=r"prefill_seq_lens \[64\] are not in seq_lens \[128, 256\]"):
        recipe_from_dict(recipe("text-generation", {"seq_lens": [128, 256], "prefill_seq_lens": [64]}))
    with pytest.raises(RecipeError, match="prefill_seq_lens: applies to text-generation models only"):
        recipe_from_dict(recipe("token-classification", {"seq_lens": [64], "prefill_seq_lens": [64]}))
    with pytest.raises(RecipeError, match="prefill_iters 30 is more than iters 20"):
        recipe_from_dict(recipe("text-generation", {"iters": 20, "prefill_iters": 30}))
    with pytest.raises(RecipeError, match="prefill_iters: applies to text-generation models only"):
        recipe_from_dict(recipe("token-classification", {"iters": 20, "prefill_iters": 10}))
