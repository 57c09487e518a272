"""The decisions taken on a validation's measurements (gate results, Pareto front, release pick),
and the report and release files that carry them. Nothing is measured here, so a change to
`gates` or `release` only re-runs this.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pipeline import manifest as mf
from pipeline.config import Recipe

log = logging.getLogger("pipeline")


def decide(
    recipe: Recipe,
    measurements: dict[str, Any],
    measurement_key: str | None = None,
    decision_key: str | None = None,
    measured_at: str | None = None,
    notes: list[str] | tuple[str, ...] = (),
) -> dict[str, Any]:
    """The report: the validate stage's measurements plus the decisions taken with the recipe's
    current gates and release settings (gate results of every variant, Pareto front, release pick).
    Nothing is measured here, so a change to `gates` or `release` only re-runs this."""
    from pipeline.gate import evaluate_variant
    from pipeline.release import pick_release
    from pipeline.report import chart_points, pareto_front

    report = {
        "format_version": measurements.get("format_version", 1),
        "recipe": recipe.name,
        "description": recipe.description,
        **{k: v for k, v in measurements.items() if k != "format_version"},
        "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "measured_at": measured_at,
        "measurement_key": measurement_key,
        "decision_key": decision_key,
    }
    report["notes"] = list(report.get("notes") or []) + list(notes)
    report["settings"] = {**report["settings"], "primary_latency_key": recipe.primary_latency_key()}
    report["gates"] = {
        r.name: r.as_report()
        for name in report["variants"]
        for r in evaluate_variant(recipe.gates, report, name)
    }
    report["pareto"] = pareto_front(chart_points(report), report.get("metric_higher_is_better", True))
    report["release"] = pick_release(recipe.gates, recipe.release, report)
    log.info("validate: release %s (%s)", report["release"]["variant"], report["release"]["reason"])
    return report


def read_report(root: Path) -> dict[str, Any]:
    try:
        return json.loads((root / "report.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def write_report_files(report: dict[str, Any], root: Path) -> None:
    """report.json/md/html/png written beside the variants, each file replaced atomically."""
    from pipeline.report import write_report

    tmp = root / f".tmp-report-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        for path in write_report(report, tmp).values():
            os.replace(path, root / path.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def release_intact(root: Path, report: dict[str, Any]) -> bool:
    """The published release matches the report's pick and passes `verify` (or, when the report
    picked nothing, no bundle is there)."""
    from pipeline.release import verify_release

    expected = (report.get("release") or {}).get("variant")
    folder = root / "release"
    if expected is None:
        return not folder.exists()
    try:
        variant = json.loads((folder / mf.MANIFEST).read_text(encoding="utf-8")).get("variant")
    except (OSError, ValueError):
        return False
    return variant == expected and not verify_release(folder)
