"""The validation report: report.json (machine-readable), report.md, report.html + report.png.

`write_report(report, folder)` writes all four from the dict `validate_variants` builds;
`load_report(path)` reads a report.json back and checks the keys the gate needs (InputError with
the file and field when it is malformed). The keys are documented in exported/README.md.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from pipeline.errors import InputError

REPORT_JSON, REPORT_MD, REPORT_HTML, REPORT_PNG = "report.json", "report.md", "report.html", "report.png"
FORMAT_VERSION = 1
UNSTRUCTURED_NOTE = (
    "unstructured sparsity gives no speed-up in ONNX Runtime: the zeroed weights are still stored and "
    "multiplied as dense tensors (same file size; only the gzip-compressed size drops)"
)


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


def pareto_front(points: Mapping[str, tuple[float, float]], higher_is_better: bool = True) -> list[str]:
    """Names of the points no other point beats: (latency, metric) with lower latency better and a
    higher (or, for perplexity-like metrics, lower) metric better; a point is dominated when another
    is at least as good on both and better on one. Sorted by latency."""
    if not higher_is_better:
        points = {name: (lat, -met) for name, (lat, met) in points.items()}
    front = []
    for name, (lat, met) in points.items():
        dominated = any(
            (o_lat <= lat and o_met >= met) and (o_lat < lat or o_met > met)
            for other, (o_lat, o_met) in points.items()
            if other != name
        )
        if not dominated:
            front.append(name)
    return sorted(front, key=lambda n: points[n][0])


def chart_points(report: dict[str, Any]) -> dict[str, tuple[float, float]]:
    """(p50 ms at the primary shape, metric) for PyTorch and every variant that has both."""
    key = report.get("settings", {}).get("primary_latency_key")
    points: dict[str, tuple[float, float]] = {}
    candidates = {"pytorch": report["baseline"], **report["variants"]}
    for name, entry in candidates.items():
        latency = (entry.get("latency") or {}).get(key)
        if latency and entry.get("metric") is not None:
            points[name] = (float(latency["p50_ms"]), float(entry["metric"]))
    return points


def plot_chart(report: dict[str, Any], path: Path) -> Path:
    """Accuracy vs latency (matplotlib, Agg): every variant, PyTorch, the Pareto front, the release."""
    from matplotlib.figure import Figure

    points = chart_points(report)
    higher = report.get("metric_higher_is_better", True)
    front = pareto_front(points, higher)
    released = (report.get("release") or {}).get("variant")
    key = report.get("settings", {}).get("primary_latency_key", "?")
    fig = Figure(figsize=(8, 5), dpi=110)
    ax = fig.add_subplot(1, 1, 1)
    if front:
        xs, ys = zip(*(points[n] for n in front), strict=True)
        ax.plot(
            xs,
            ys,
            "-o",
            color="tab:orange",
            markerfacecolor="none",
            markersize=13,
            linewidth=1.5,
            zorder=1,
            label="Pareto front",
        )
    for index, (name, (x, y)) in enumerate(sorted(points.items(), key=lambda item: item[1][0])):
        if name == "pytorch":
            ax.scatter([x], [y], marker="s", s=60, color="grey", zorder=2, label="PyTorch eager fp32")
        else:
            ax.scatter([x], [y], marker="o", s=45, color="tab:blue", zorder=2)
        # Neighbours along the latency axis get labels above / below, so close points stay legible.
        offset = (5, 6) if index % 2 == 0 else (5, -13)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=offset, fontsize=8)
    if released in points:
        x, y = points[released]
        ax.scatter([x], [y], marker="*", s=320, color="tab:red", zorder=3, label=f"released: {released}")
    lats = [p[0] for p in points.values()]
    if lats and max(lats) / max(min(lats), 1e-9) > 20:
        ax.set_xscale("log")
    ax.set_xlabel(f"p50 latency at {key} (ms, lower is better)")
    ax.set_ylabel(f"{report.get('metric_name', 'metric')} ({'higher' if higher else 'lower'} is better)")
    machine = report.get("machine") or {}
    threads = report.get("settings", {}).get("latency", {}).get("threads")
    ax.set_title(
        f"{report.get('recipe')}: accuracy vs latency\n{machine.get('cpu_model', '')}, {threads} thread(s)",
        fontsize=10,
    )
    ax.grid(True, alpha=0.3)
    if points:
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(str(path), format="png")
    return path


# -- markdown --------------------------------------------------------------------------------------


def _num(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _mb(value: Any) -> str:
    return "-" if value is None else f"{value / 1e6:.1f} MB"


def _keys(report: dict[str, Any]) -> list[str]:
    return list(report["baseline"].get("latency") or {})


def summary_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The main table: one row per candidate (PyTorch first), shared by markdown and HTML."""
    keys = _keys(report)
    metric = report.get("metric_name", "metric")
    header = [
        "variant",
        metric,
        "drop vs fp32",
        "agreement",
        *[f"p50 ms {k}" for k in keys],
        *[f"speed-up {k}" for k in keys],
        "size",
        "peak RSS",
        "gates",
    ]
    released = (report.get("release") or {}).get("variant")
    base = report["baseline"]
    rows = [
        [
            "PyTorch eager fp32 (baseline)",
            _num(base.get("metric")),
            "-",
            "-",
            *[_num((base["latency"].get(k) or {}).get("p50_ms"), 2) for k in keys],
            *["1.00x" for _ in keys],
            _mb(base.get("size_bytes")),
            _mb(base.get("peak_rss_bytes")),
            "-",
        ]
    ]
    for name, variant in report["variants"].items():
        checks = {
            n.split("/", 1)[1]: g for n, g in report.get("gates", {}).items() if n.split("/", 1)[0] == name
        }
        failed = [check for check, g in checks.items() if not g["passed"]]
        gates = "-" if not checks else ("pass" if not failed else "FAIL: " + ", ".join(failed))
        speed = variant.get("speedup_vs_pytorch") or {}
        rows.append(
            [
                name + (" (released)" if name == released else ""),
                _num(variant.get("metric")),
                _num(variant.get("metric_drop")),
                _num(variant.get("agreement")),
                *[_num((variant["latency"].get(k) or {}).get("p50_ms"), 2) for k in keys],
                *[("-" if speed.get(k) is None else f"{speed[k]:.2f}x") for k in keys],
                _mb(variant.get("size_bytes")),
                _mb(variant.get("peak_rss_bytes")),
                gates,
            ]
        )
    return header, rows


def latency_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    header = ["candidate", "provider", "shape", "p50 ms", "p90 ms", "p99 ms", "throughput /s"]
    rows = []

    def add(name: str, provider: str, latency: dict[str, Any]) -> None:
        for key, stats in latency.items():
            rows.append(
                [
                    name,
                    provider,
                    key,
                    _num(stats.get("p50_ms"), 3),
                    _num(stats.get("p90_ms"), 3),
                    _num(stats.get("p99_ms"), 3),
                    _num(stats.get("throughput_per_s"), 1),
                ]
            )

    add("pytorch", "torch CPU", report["baseline"].get("latency") or {})
    for name, variant in report["variants"].items():
        for provider, entry in (variant.get("providers") or {}).items():
            if entry.get("latency"):
                add(name, provider, entry["latency"])
    return header, rows


def provider_lines(report: dict[str, Any]) -> list[str]:
    lines = []
    for provider, status in (report.get("providers") or {}).items():
        short = provider.removesuffix("ExecutionProvider") or provider
        lines.append(f"{short}: {status}")
    return lines


def gate_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    rows = [
        [
            name,
            "pass" if g["passed"] else "FAIL",
            _num(g.get("value")),
            _num(g.get("limit")),
            g.get("detail", ""),
        ]
        for name, g in (report.get("gates") or {}).items()
    ]
    return ["check", "result", "value", "limit", "detail"], rows


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    def cell(text: str) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _machine_line(report: dict[str, Any]) -> str:
    machine = report.get("machine") or {}
    flags = [k for k, v in (machine.get("flags") or {}).items() if v]
    settings = report.get("settings", {})
    lat = settings.get("latency", {})
    return (
        f"{machine.get('cpu_model', '?')} ({machine.get('cores', '?')} cores; "
        f"{', '.join(flags) or 'no INT8 flags'}), "
        f"onnxruntime {machine.get('ort_version', '?')}; {lat.get('threads', '?')} thread(s), "
        f"warm-up {lat.get('warmup', '?')}, {lat.get('iters', '?')} timed runs per shape, interleaved"
    )


def render_markdown(report: dict[str, Any]) -> str:
    settings = report.get("settings", {})
    release = report.get("release") or {}
    parts = [
        f"# Validation report: {report['recipe']}",
        "",
        *([report["description"], ""] if report.get("description") else []),
        f"- task: {report.get('task', '?')}; metric: **{report.get('metric_name')}** on "
        f"{settings.get('eval_examples', '?')} eval examples "
        f"(sha256 {str(settings.get('eval_data_sha256', ''))[:12]})",
        f"- machine: {_machine_line(report)}",
        f"- generated: {report.get('generated_at', '?')}",
        "- speed-up = PyTorch p50 / variant p50, both measured in this run (ratios are what to compare "
        "across machines, not absolute times)",
        "",
        "## Summary",
        "",
        _md_table(*summary_rows(report)),
        "",
        f"**Release:** {release.get('variant') or 'none'} - {release.get('reason', '')}",
        "",
        f"Pareto front (p50 at {settings.get('primary_latency_key')} vs {report.get('metric_name')}): "
        + (", ".join(report.get("pareto") or []) or "-"),
        "",
        "![accuracy vs latency](report.png)",
        "",
        "## Providers",
        "",
        *[f"- {line}" for line in provider_lines(report)],
        "",
    ]
    notes = list(report.get("notes") or [])
    for name, variant in report["variants"].items():
        notes += [f"{name}: {note}" for note in variant.get("notes") or []]
    if notes:
        parts += ["## Notes", "", *[f"- {note}" for note in notes], ""]
    parts += ["## Latency", "", _md_table(*latency_rows(report)), ""]
    if report.get("gates"):
        parts += ["## Gates", "", _md_table(*gate_rows(report)), ""]
    parts += ["## Classification reports", ""]
    for name, entry in {"PyTorch eager fp32 (baseline)": report["baseline"], **report["variants"]}.items():
        text = entry.get("classification_report")
        if text:
            parts += [f"### {name}", "", "```", text.rstrip(), "```", ""]
    return "\n".join(parts).rstrip() + "\n"


# -- html ------------------------------------------------------------------------------------------


def _html_table(header: list[str], rows: list[list[str]], table_id: str) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def render_html(report: dict[str, Any], png: bytes) -> str:
    """A self-contained page (chart embedded as a data URI) with the same tables as report.md."""
    esc = html.escape
    release = report.get("release") or {}
    settings = report.get("settings", {})
    notes = list(report.get("notes") or [])
    for name, variant in report["variants"].items():
        notes += [f"{name}: {note}" for note in variant.get("notes") or []]
    reports = ""
    for name, entry in {"PyTorch eager fp32 (baseline)": report["baseline"], **report["variants"]}.items():
        if entry.get("classification_report"):
            reports += f"<h3>{esc(name)}</h3><pre>{esc(entry['classification_report'])}</pre>"
    image = base64.b64encode(png).decode("ascii")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>Validation report: {esc(report["recipe"])}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: right; }}
th:first-child, td:first-child {{ text-align: left; }}
pre {{ background: #f6f6f6; padding: 0.8em; overflow-x: auto; }}
.release {{ font-weight: bold; }}
</style></head>
<body>
<h1>Validation report: {esc(report["recipe"])}</h1>
<p>{esc(report.get("description") or "")}</p>
<ul>
<li>task: {esc(str(report.get("task", "?")))}; metric: <b>{esc(report.get("metric_name", ""))}</b> on
{esc(str(settings.get("eval_examples", "?")))} eval examples</li>
<li>machine: {esc(_machine_line(report))}</li>
<li>generated: {esc(str(report.get("generated_at", "?")))}</li>
</ul>
<h2>Summary</h2>
{_html_table(*summary_rows(report), table_id="summary")}
<p class="release" id="release">Release: {esc(release.get("variant") or "none")} -
{esc(release.get("reason", ""))}</p>
<figure><img id="chart" alt="accuracy vs latency chart" src="data:image/png;base64,{image}">
<figcaption>Accuracy vs p50 latency at {esc(str(settings.get("primary_latency_key")))}; Pareto front:
{esc(", ".join(report.get("pareto") or []) or "-")}; released variant starred.</figcaption></figure>
<h2>Providers</h2>
<ul>{"".join(f"<li>{esc(line)}</li>" for line in provider_lines(report))}</ul>
{("<h2>Notes</h2><ul>" + "".join(f"<li>{esc(n)}</li>" for n in notes) + "</ul>") if notes else ""}
<h2>Latency</h2>
{_html_table(*latency_rows(report), table_id="latency")}
{("<h2>Gates</h2>" + _html_table(*gate_rows(report), table_id="gates")) if report.get("gates") else ""}
<h2>Classification reports</h2>
{reports}
</body></html>
"""
