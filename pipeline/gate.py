"""CI gate: check a report against the recipe's limits and an optional baseline report.

    python -m pipeline gate RECIPE [--baseline OLD_REPORT.json] [--junit FILE.xml]

prints one line per check and exits 0 when all pass, 3 when any fails, 4 when none fails but some
cannot be decided (inconclusive: a speed-up's confidence interval straddles its limit, or the
timing was interfered with by other work on the machine), 2 when the report or the baseline is
missing or malformed (or is for another recipe).

The checks are recomputed from the raw figures in `exported/<recipe>/report.json` with the
recipe's *current* `gates` section, so tightening a limit needs no re-run. Which variants are gated
is `gates.apply_to`: the released variant (default; no release is itself a failure), every
variant, or a list of names. The release pick (`pipeline.release.pick_release`) uses the same
`evaluate_variant` on every variant. Against a baseline report only ratios are compared (metric and
speed-up vs PyTorch measured in the same run), never absolute times from another machine.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline.bench.stats import verdict
from pipeline.config import GatesConfig, Recipe
from pipeline.errors import InputError

EXIT_PASS, EXIT_FAIL, EXIT_INCONCLUSIVE = 0, 3, 4


@dataclass
class GateResult:
    """One check: `name` is '<variant>/<check>' (what JUnit and report.json call it)."""

    variant: str
    check: str
    passed: bool
    value: Any = None
    limit: Any = None
    detail: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    # Neither proven nor refuted: a speed interval straddles its limit or the timing was interfered
    # with. Not a pass (nothing unproven is released), not a failure (exit 4, a JUnit error).
    inconclusive: bool = False

    @property
    def name(self) -> str:
        return f"{self.variant}/{self.check}"

    @property
    def status(self) -> str:
        return "pass" if self.passed else ("inconclusive" if self.inconclusive else "fail")

    def line(self) -> str:
        status = self.status.upper()
        text = f"{status} {self.name}: {_fmt(self.value)}"
        if self.limit is not None:
            text += f" (limit {_fmt(self.limit)})"
        if self.detail:
            text += f" - {self.detail}"
        return text

    def as_report(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "status": self.status,
            "value": self.value,
            "limit": self.limit,
            "detail": self.detail,
        }


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if value is None:
        return "n/a"
    return str(value)


# -- checks on one report --------------------------------------------------------------------------


def evaluate_variant(gates: GatesConfig, report: dict[str, Any], name: str) -> list[GateResult]:
    """The recipe's limits checked on variant `name` of `report` (a loaded report.json dict)."""
    variant = report["variants"][name]
    results: list[GateResult] = []
    metric_name = report.get("metric_name", "metric")
    if gates.max_metric_drop is not None:
        drop = variant.get("metric_drop")
        passed = drop is not None and math.isfinite(drop) and drop <= gates.max_metric_drop + 1e-12
        results.append(
            GateResult(
                name,
                "max_metric_drop",
                passed,
                None if drop is None else round(float(drop), 6),
                gates.max_metric_drop,
                f"{metric_name} {_fmt(variant.get('metric'))} "
                f"vs PyTorch {_fmt(report['baseline'].get('metric'))}",
            )
        )
    if gates.max_metric_drop_relative is not None:
        drop, base = variant.get("metric_drop"), report["baseline"].get("metric")
        relative = drop / abs(base) if drop is not None and base else None
        results.append(
            GateResult(
                name,
                "max_metric_drop_relative",
                relative is not None
                and math.isfinite(relative)
                and relative <= gates.max_metric_drop_relative + 1e-12,
                None if relative is None else round(float(relative), 6),
                gates.max_metric_drop_relative,
                f"{metric_name} {_fmt(variant.get('metric'))} vs PyTorch {_fmt(base)} (drop / baseline)",
            )
        )
    if gates.min_speedup_vs_pytorch is not None:
        results.append(_speedup_check(gates, report, name, variant))
    if gates.max_model_bytes is not None:
        size = variant.get("size_bytes")
        results.append(
            GateResult(
                name,
                "max_model_bytes",
                size is not None and size <= gates.max_model_bytes,
                size,
                gates.max_model_bytes,
            )
        )
    if gates.require_attention_fusion:
        fusion = variant.get("attention_fusion")
        if not fusion:
            results.append(
                GateResult(
                    name, "require_attention_fusion", True, "n/a", None, "no optimize step in this variant"
                )
            )
        else:
            complete = bool(fusion.get("complete"))
            results.append(
                GateResult(
                    name,
                    "require_attention_fusion",
                    complete,
                    f"{fusion.get('fused')}/{fusion.get('expected')}",
                    "all layers",
                    "attention nodes fused / expected (optimize stage)",
                )
            )
    for provider in gates.require_provider:
        entry = (variant.get("providers") or {}).get(provider) or {}
        status = entry.get("status", "not validated (not in validate.providers)")
        results.append(
            GateResult(
                name,
                f"require_provider:{provider}",
                status == "ok",
                status,
                "ok",
                ("session providers: " + ", ".join(entry["session_providers"]))
                if entry.get("session_providers")
                else "",
            )
        )
    return results


def _interfered(report: dict[str, Any], key: str) -> list[str]:
    quality = ((report.get("settings") or {}).get("timing_quality") or {}).get(key) or {}
    return list(quality.get("reasons") or []) if quality.get("interfered") else []


def _speedup_check(
    gates: GatesConfig, report: dict[str, Any], name: str, variant: dict[str, Any]
) -> GateResult:
    """min_speedup_vs_pytorch at every gated shape, decided on the speed-up's confidence interval:
    pass when every interval clears the limit, fail when one lies entirely below it, inconclusive
    otherwise (or when that shape's timing was interfered with). A report without intervals (older
    format) is judged on the point ratios."""
    limit = gates.min_speedup_vs_pytorch
    ratios = variant.get("speedup_vs_pytorch") or {}
    intervals = variant.get("speedup_ci") or {}
    keys = gates.speedup_at or sorted(ratios)
    missing = [k for k in keys if k not in ratios]
    if missing or not keys:
        return GateResult(
            name,
            "min_speedup_vs_pytorch",
            False,
            None,
            limit,
            f"no speed-up measured at {', '.join(missing) or 'any shape'} "
            f"(measured: {', '.join(sorted(ratios)) or 'none'})",
        )
    verdicts, parts = {}, []
    for key in keys:
        low, high = intervals.get(key) or (ratios[key], ratios[key])
        interference = _interfered(report, key)
        verdicts[key] = verdict({"low": low, "high": high}, limit, interfered=bool(interference))
        text = f"{key} {ratios[key]:.2f}x [{low:.2f}, {high:.2f}]"
        if interference:
            text += " (timing interfered with: " + "; ".join(interference) + ")"
        parts.append(text)
    worst = min(keys, key=lambda k: ratios[k])
    status = (
        "fail"
        if "fail" in verdicts.values()
        else ("inconclusive" if "inconclusive" in verdicts.values() else "pass")
    )
    return GateResult(
        name,
        "min_speedup_vs_pytorch",
        status == "pass",
        ratios[worst],
        limit,
        f"worst at {worst}; " + ", ".join(parts) + ("" if intervals else " (no intervals in this report)"),
        inconclusive=status == "inconclusive",
    )


def gated_variants(gates: GatesConfig, report: dict[str, Any]) -> tuple[list[str], list[GateResult]]:
    """Variant names `gate` checks, plus failures from the scope itself (no release, unknown names)."""
    variants = report["variants"]
    if gates.apply_to == "all":
        return list(variants), []
    if gates.apply_to == "release":
        release = report.get("release") or {}
        chosen = release.get("variant")
        if chosen is None:
            reason = release.get("reason") or "no variant passed the gates"
            # Nothing released because a verdict could not be decided (a speed interval straddling
            # its limit, a busy machine) is not a regression: inconclusive, exit 4.
            undecided = [
                name
                for name in variants
                if (checks := evaluate_variant(gates, report, name))
                and not any(r.status == "fail" for r in checks)
                and any(r.status == "inconclusive" for r in checks)
            ]
            if undecided:
                reason += f" (undecided, not failed: {', '.join(undecided)}; re-run on a quiet machine)"
            return [], [
                GateResult("release", "exists", False, None, None, reason, inconclusive=bool(undecided))
            ]
        if chosen not in variants:
            raise InputError(f"report: release.variant {chosen!r} is not one of the report's variants")
        return [chosen], [GateResult("release", "exists", True, chosen, None, release.get("reason", ""))]
    missing = [name for name in gates.apply_to if name not in variants]
    failures = [
        GateResult(
            name, "present", False, None, None, "gates.apply_to names a variant the report does not have"
        )
        for name in missing
    ]
    return [name for name in gates.apply_to if name in variants], failures


def evaluate_report(gates: GatesConfig, report: dict[str, Any]) -> list[GateResult]:
    """Every check `gate` runs on one report, without a baseline."""
    names, results = gated_variants(gates, report)
    for name in names:
        results += evaluate_variant(gates, report, name)
    return results


def compare_baseline(
    gates: GatesConfig, report: dict[str, Any], baseline: dict[str, Any], variants: list[str]
) -> list[GateResult]:
    """Regressions vs an older report: metric (absolute tolerance) and speed-up ratios (relative)."""
    results: list[GateResult] = []
    tol_m, tol_s = gates.baseline_metric_tolerance, gates.baseline_speedup_tolerance
    sign = 1.0 if report.get("metric_higher_is_better", True) else -1.0  # change > 0 = better
    old_base, new_base = baseline["baseline"].get("metric"), report["baseline"].get("metric")
    if old_base is not None and new_base is not None:
        change = round(sign * (float(new_base) - float(old_base)), 6)
        results.append(
            GateResult(
                "pytorch",
                "baseline_metric",
                change >= -tol_m - 1e-12,
                change,
                -tol_m,
                f"PyTorch {report.get('metric_name', 'metric')} {_fmt(new_base)} "
                f"vs {_fmt(old_base)} in the baseline",
            )
        )
    for name in variants:
        new, old = report["variants"][name], baseline["variants"].get(name)
        if old is None:
            results.append(
                GateResult(
                    name,
                    "baseline",
                    True,
                    "new variant",
                    None,
                    "not in the baseline report; nothing to compare",
                )
            )
            continue
        if new.get("metric") is None or old.get("metric") is None:
            results.append(GateResult(name, "baseline_metric", False, None, -tol_m, "metric missing"))
        else:
            change = round(sign * (float(new["metric"]) - float(old["metric"])), 6)
            results.append(
                GateResult(
                    name,
                    "baseline_metric",
                    change >= -tol_m - 1e-12,
                    change,
                    -tol_m,
                    f"{_fmt(new['metric'])} vs {_fmt(old['metric'])} in the baseline",
                )
            )
        new_r, old_r = new.get("speedup_vs_pytorch") or {}, old.get("speedup_vs_pytorch") or {}
        keys = [k for k in (gates.speedup_at or sorted(old_r)) if k in old_r]
        missing = [k for k in keys if k not in new_r]
        if missing:
            results.append(
                GateResult(
                    name,
                    "baseline_speedup",
                    False,
                    None,
                    -tol_s,
                    f"shapes {', '.join(missing)} no longer measured",
                )
            )
            continue
        if not keys:
            continue
        changes = {k: float(new_r[k]) / float(old_r[k]) - 1.0 for k in keys if old_r[k]}
        worst = min(changes, key=changes.get)
        # The new ratio must keep (1 - tolerance) of the old one; decided on the new interval.
        intervals = new.get("speedup_ci") or {}
        verdicts = {}
        for key in changes:
            low, high = intervals.get(key) or (new_r[key], new_r[key])
            threshold = float(old_r[key]) * (1.0 - tol_s)
            verdicts[key] = verdict(
                {"low": low, "high": high}, threshold, interfered=bool(_interfered(report, key))
            )
        status = (
            "fail"
            if "fail" in verdicts.values()
            else ("inconclusive" if "inconclusive" in verdicts.values() else "pass")
        )
        results.append(
            GateResult(
                name,
                "baseline_speedup",
                status == "pass",
                round(changes[worst], 4),
                -tol_s,
                "relative change of the speed-up ratio, worst at "
                + worst
                + "; "
                + ", ".join(f"{k} {new_r[k]:.2f}x vs {old_r[k]:.2f}x ({verdicts[k]})" for k in keys),
                inconclusive=status == "inconclusive",
            )
        )
    return results


# -- the command -----------------------------------------------------------------------------------


def run_gate(
    recipe: Recipe, report_path: Path, baseline_path: Path | None = None, junit_path: Path | None = None
) -> list[GateResult]:
    """All checks for `recipe` on `report_path` (+ regressions vs `baseline_path`); writes JUnit XML.

    InputError (exit 2) when a report is missing, malformed or for another recipe.
    """
    from pipeline.report import load_report

    report = load_report(report_path, label="report")
    _same_recipe(recipe, report, report_path)
    gates = recipe.gates
    if gates.speedup_at:
        measured = set(report["baseline"]["latency"])
        unknown = [k for k in gates.speedup_at if k not in measured]
        if unknown:
            raise InputError(
                f"gates.speedup_at: {', '.join(unknown)} not measured in {report_path} "
                f"(measured: {', '.join(sorted(measured))})"
            )
    names, results = gated_variants(gates, report)
    for name in names:
        results += evaluate_variant(gates, report, name)
    if baseline_path is not None:
        baseline = load_report(baseline_path, label="baseline")
        _same_recipe(recipe, baseline, baseline_path)
        if baseline.get("metric_name") != report.get("metric_name"):
            raise InputError(
                f"{baseline_path}: baseline metric {baseline.get('metric_name')!r} differs from the "
                f"report's {report.get('metric_name')!r}; refresh the baseline (make baseline)"
            )
        results += compare_baseline(gates, report, baseline, names)
    if junit_path is not None:
        write_junit(results, Path(junit_path), suite=f"gate.{recipe.name}")
    return results


def _same_recipe(recipe: Recipe, report: dict[str, Any], path: Path) -> None:
    if report.get("recipe") != recipe.name:
        raise InputError(f"{path}: report is for recipe {report.get('recipe')!r}, not {recipe.name!r}")


def write_junit(results: list[GateResult], path: Path, suite: str) -> Path:
    """JUnit XML: one testcase per check, a <failure> for each failed one and an <error> for each
    inconclusive one (the check could not be decided: not a pass, not a regression)."""
    import xml.etree.ElementTree as ET

    failures = sum(r.status == "fail" for r in results)
    errors = sum(r.status == "inconclusive" for r in results)
    counts = {"tests": str(len(results)), "failures": str(failures), "errors": str(errors)}
    root = ET.Element("testsuites", name=suite, **counts)
    node = ET.SubElement(root, "testsuite", name=suite, skipped="0", **counts)
    for result in results:
        case = ET.SubElement(node, "testcase", classname=suite, name=result.name, time="0")
        if result.passed:
            ET.SubElement(case, "system-out").text = result.line()
        else:
            kind = "failure" if result.status == "fail" else "error"
            element = ET.SubElement(
                case,
                kind,
                message=result.line(),
                type="GateFailure" if kind == "failure" else "GateInconclusive",
            )
            element.text = json.dumps(asdict(result), default=str)
    path.parent.mkdir(parents=True, exist_ok=True)
    ET.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)
    return path


def gate_command(
    recipe_path: Path,
    baseline: Path | None = None,
    junit: Path | None = None,
    exported: Path = Path("exported"),
    overrides: list[str] | None = None,
    out: Any = None,
) -> int:
    """`python -m pipeline gate`: print one line per check; 0 all pass, 3 any fails.

    Bad input (recipe, report, baseline) raises RecipeError/InputError (exit 2 through the CLI).
    """
    import sys

    from pipeline.config import load_recipe

    out = out or sys.stdout
    recipe = load_recipe(recipe_path, overrides)
    report_path = Path(exported) / recipe.name / "report.json"
    results = run_gate(recipe, report_path, baseline, junit)
    for result in results:
        print(result.line(), file=out)
    failed = sum(r.status == "fail" for r in results)
    undecided = sum(r.status == "inconclusive" for r in results)
    passed = len(results) - failed - undecided
    summary = f"gate {recipe.name}: {passed}/{len(results)} checks passed"
    summary += f", {failed} failed" if failed else ""
    summary += f", {undecided} inconclusive (re-run on a quiet machine)" if undecided else ""
    print(summary, file=out)
    if failed:
        return EXIT_FAIL
    return EXIT_INCONCLUSIVE if undecided else EXIT_PASS


def add_gate_arguments(parser: Any) -> None:
    """The `gate` subcommand's arguments (for pipeline.cli)."""
    parser.add_argument("recipe", type=Path, help="recipe YAML file")
    parser.add_argument("--baseline", type=Path, help="an older report.json to compare ratios against")
    parser.add_argument("--junit", type=Path, help="write JUnit XML results to this file")
    parser.add_argument("--exported", type=Path, default=Path("exported"), help="output root folder")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe field",
    )
