"""The validation report: report.json (machine-readable), report.md, report.html + report.png.

`write_report(report, folder)` writes all four from the report dict (the validate stage's
measurements plus the runner's decisions); the pages come from Jinja2 templates in templates/
(report.html.j2 autoescaped), their tables from pipeline.report.tables, the chart from chart.py.
`load_report(path)` reads a report.json back and checks the keys the gate needs (InputError with
the file and field when it is malformed). The keys are documented in exported/README.md.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from pipeline.errors import InputError
from pipeline.report.chart import chart_points, pareto_front, plot_chart

__all__ = ["check_report", "chart_points", "load_report", "pareto_front", "write_report"]

REPORT_JSON, REPORT_MD, REPORT_HTML, REPORT_PNG = "report.json", "report.md", "report.html", "report.png"
# -- schema (what the gate relies on; extra keys are allowed) ----------------------------------------


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class _Latency(_Open):
    p50_ms: float
    p90_ms: float
    p99_ms: float | None  # None where a timing does not record it (decoder decode steps)


class _Baseline(_Open):
    metric: float | None
    latency: dict[str, _Latency]


class _Variant(_Open):
    metric: float | None
    metric_drop: float | None
    agreement: float | None
    latency: dict[str, _Latency]
    speedup_vs_pytorch: dict[str, float]
    size_bytes: int
    stages: list[Any]


class _Release(_Open):
    variant: str | None
    reason: str


class _Gate(_Open):
    passed: bool
    value: Any = None
    limit: Any = None


class _Report(_Open):
    recipe: str
    metric_name: str
    machine: dict[str, Any]
    baseline: _Baseline
    variants: dict[str, _Variant]
    release: _Release
    gates: dict[str, _Gate]


def check_report(document: Any, label: str = "report") -> dict[str, Any]:
    """`document` if it has the report's shape; InputError naming the first bad field otherwise."""
    if not isinstance(document, dict):
        raise InputError(f"{label}: expected a JSON object at the top level, got {type(document).__name__}")
    try:
        _Report.model_validate(document)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        problem = "required key is missing" if first["type"] == "missing" else first["msg"]
        raise InputError(f"{label}: {where}: {problem}") from None
    return document


def load_report(path: Path, label: str = "report") -> dict[str, Any]:
    """Read and check a report.json; InputError (exit 2) when missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: {label} not found (run the recipe first: python -m pipeline run RECIPE)")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise InputError(f"{path}: {label} is not UTF-8 text") from None
    except json.JSONDecodeError as err:
        raise InputError(
            f"{path}: {label} is not valid JSON (line {err.lineno}, column {err.colno})"
        ) from None
    return check_report(document, label=f"{path}")


# -- writers ---------------------------------------------------------------------------------------


def write_report(report: dict[str, Any], folder: Path) -> dict[str, Path]:
    """report.json, report.png (chart), report.md and report.html (chart embedded) in `folder`."""
    from pipeline.manifest import write_json
    from pipeline.report.render import render_html, render_markdown

    folder = Path(folder)
    check_report(json.loads(json.dumps(report, default=str)), label="report being written")
    paths = {"json": folder / REPORT_JSON, "png": folder / REPORT_PNG}
    write_json(paths["json"], report)
    plot_chart(report, paths["png"])
    paths["md"] = folder / REPORT_MD
    paths["md"].write_text(render_markdown(report), encoding="utf-8")
    paths["html"] = folder / REPORT_HTML
    paths["html"].write_text(render_html(report, paths["png"].read_bytes()), encoding="utf-8")
    return paths
