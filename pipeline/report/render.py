"""report.md and report.html from their Jinja2 templates (templates/), tables from tables.py.

HTML is autoescaped (every cell, note and name is data); Markdown tables are rendered by tabulate
(the same renderer as benchmarks/RESULTS.md), with pipes in cells escaped.
"""

from __future__ import annotations

import base64
from functools import lru_cache
from pathlib import Path
from typing import Any

from pipeline.report import tables

TEMPLATES = Path(__file__).parent / "templates"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub-flavoured Markdown table (tabulate), with | and newlines in cells made harmless."""
    from tabulate import tabulate

    def cell(text: Any) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    return tabulate(
        [[cell(c) for c in row] for row in rows],
        headers=[cell(h) for h in header],
        tablefmt="github",
        disable_numparse=True,
    )


@lru_cache(maxsize=2)
def _environment(autoescape: bool) -> Any:
    from jinja2 import Environment, FileSystemLoader

    env = Environment(
        loader=FileSystemLoader(TEMPLATES),
        autoescape=autoescape,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["markdown_table"] = lambda table: markdown_table(*table)
    return env


def _context(report: dict[str, Any]) -> dict[str, Any]:
    notes = list(report.get("notes") or [])
    for name, variant in report["variants"].items():
        notes += [f"{name}: {note}" for note in variant.get("notes") or []]
    classification = [
        (name, entry["classification_report"].rstrip())
        for name, entry in {"PyTorch eager fp32 (baseline)": report["baseline"], **report["variants"]}.items()
        if entry.get("classification_report")
    ]
    return {
        "r": report,
        "settings": report.get("settings", {}),
        "release": report.get("release") or {},
        "machine": tables.machine_line(report),
        "summary": tables.summary_rows(report),
        "latency": tables.latency_rows(report),
        "gates": tables.gate_rows(report) if report.get("gates") else None,
        "search": tables.search_rows(report),
        "adapters": tables.adapter_rows(report),
        "providers": tables.provider_lines(report),
        "notes": notes,
        "classification": classification,
    }


def render_markdown(report: dict[str, Any]) -> str:
    text = _environment(False).get_template("report.md.j2").render(**_context(report))
    return text.rstrip() + "\n"


def render_html(report: dict[str, Any], png: bytes) -> str:
    """A self-contained page (chart embedded as a data URI) with the same tables as report.md."""
    context = _context(report)
    context["image"] = base64.b64encode(png).decode("ascii")
    return _environment(True).get_template("report.html.j2").render(**context)
