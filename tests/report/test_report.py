"""Report writers and reader: Pareto front, tables, chart, HTML, malformed reports."""

from __future__ import annotations

import copy
import json
import re

import pytest
from helpers import crafted_report, write_json

from pipeline.errors import InputError
from pipeline.report import chart_points, load_report, pareto_front, write_report
from pipeline.report.render import render_markdown
from pipeline.stages.validate import UNSTRUCTURED_NOTE


def test_pareto_front_hand_checked():
    points = {
        "pytorch": (40.0, 0.42),  # slow, accurate: dominated by fp32 (faster, same metric)
        "fp32": (10.0, 0.42),
        "int8": (6.0, 0.41),
        "bad": (8.0, 0.30),  # dominated by int8 (faster and better)
        "twin": (6.0, 0.41),  # ties int8 on both: neither dominates the other
    }
    assert pareto_front(points) == ["int8", "twin", "fp32"]
    assert pareto_front({}) == []
    # Perplexity: lower is better, so the low-perplexity slow point and the fast one both count.
    ppl = {"slow": (10.0, 20.0), "fast": (5.0, 25.0), "worse": (8.0, 30.0)}
    assert pareto_front(ppl, higher_is_better=False) == ["fast", "slow"]


def test_chart_points_use_the_primary_shape():
    report = crafted_report()
    assert chart_points(report) == {"pytorch": (40.0, 0.42), "fp32": (10.0, 0.42), "int8": (6.0, 0.412)}


def test_write_report_files(tmp_path):
    report = crafted_report()
    report["variants"]["int8"]["classification_report"] = "LOC 0.5 0.5 0.5 10"
    report["variants"]["int8"]["notes"] = [UNSTRUCTURED_NOTE]
    report["gates"] = {"int8/max_metric_drop": {"passed": True, "value": 0.008, "limit": 0.01, "detail": ""}}
    paths = write_report(report, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "report.html",
        "report.json",
        "report.md",
        "report.png",
    ]
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(paths["json"].read_text()) == report
    md = re.sub(" +", " ", paths["md"].read_text())  # tabulate pads the table cells
    assert "| int8 (released) | 0.4120 | 0.0080 | 0.9800 | 6.00 | 40.00 | 6.67x | 5.00x | 23.0 MB |" in md
    assert "| PyTorch eager fp32 (baseline) | 0.4200 |" in md
    assert "CUDA: not available on this machine (no GPU)" in md
    assert "no speed-up in ONNX Runtime" in md and "LOC 0.5 0.5 0.5 10" in md
    html = paths["html"].read_text()
    assert 'src="data:image/png;base64,' in html and '<table id="summary">' in html
    assert "Release: int8" in html


def test_load_report_rejects_missing_and_malformed(tmp_path):
    with pytest.raises(InputError, match="report not found"):
        load_report(tmp_path / "absent.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(InputError, match=r"not valid JSON \(line 1"):
        load_report(bad)
    write_json(bad, [1, 2])
    with pytest.raises(InputError, match="expected a JSON object"):
        load_report(bad)
    report = crafted_report()
    del report["variants"]["int8"]["latency"]
    write_json(bad, report)
    with pytest.raises(InputError, match=r"variants\.int8\.latency: required key is missing"):
        load_report(bad)
    report = crafted_report()
    report["variants"]["fp32"]["speedup_vs_pytorch"]["b1_s64"] = "fast"
    write_json(bad, report)
    with pytest.raises(InputError, match=r"variants\.fp32\.speedup_vs_pytorch\.b1_s64"):
        load_report(bad)
    good = write_json(tmp_path / "good.json", crafted_report())
    assert load_report(good)["recipe"] == "tiny-validate"


def test_markdown_without_release_says_why():
    report = crafted_report(release={"variant": None, "reason": "no variant passes all gates: int8: drop"})
    text = render_markdown(copy.deepcopy(report))
    assert "**Release:** none - no variant passes all gates" in text


def test_finalize_report_reapplies_gates_without_measuring(tmp_path):
    from helpers import recipe_for

    from pipeline.release.decide import decide
    from pipeline.report import write_report

    report = crafted_report()
    report["settings"]["latency"] = {"threads": 2}
    recipe = recipe_for(
        tmp_path / "m",
        gates={"max_metric_drop": 0.005},
        validate={"latency": {"batch_sizes": [1, 8], "seq_lens": [64]}},
    )
    report = decide(recipe, report)
    write_report(report, tmp_path)
    assert report["release"]["variant"] == "fp32"  # int8 drops 0.008 > 0.005
    assert report["gates"]["int8/max_metric_drop"]["passed"] is False
    assert report["gates"]["fp32/max_metric_drop"]["passed"] is True
    assert json.loads((tmp_path / "report.json").read_text())["release"]["variant"] == "fp32"
