"""The release pick: the fastest variant within every gate, or the one the recipe names."""

from __future__ import annotations

from typing import Any

from pipeline.config.gates import GatesConfig
from pipeline.config.release import ReleaseConfig
from pipeline.gate import evaluate_variant


def pick_release(gates: GatesConfig, release: ReleaseConfig, report: dict[str, Any]) -> dict[str, Any]:
    """{"variant": name or None, "reason": why}, from the report's figures and the recipe's gates."""
    variants = report["variants"]
    key = report.get("settings", {}).get("primary_latency_key")
    results = {name: evaluate_variant(gates, report, name) for name in variants}
    passing = [name for name, checks in results.items() if all(c.passed for c in checks)]

    def failures(name: str) -> str:
        return "; ".join(c.line().removeprefix("FAIL ") for c in results[name] if not c.passed)

    def describe(name: str) -> str:
        entry = variants[name]
        stats = (entry.get("latency") or {}).get(key) or {}
        speed = (entry.get("speedup_vs_pytorch") or {}).get(key)
        checks = len(results[name])
        return (
            f"p50 {stats.get('p50_ms', float('nan')):.3g} ms at {key}"
            + (f", {speed:.2f}x vs PyTorch" if speed else "")
            + f"; {report.get('metric_name')} {entry.get('metric', float('nan')):.4f}"
            + f" (drop {entry.get('metric_drop', float('nan')):.4f})"
            + (f"; passes all {checks} gate checks" if checks else "; no gates configured")
        )

    pick = release.pick
    if pick != "fastest_within_gates":
        if pick not in variants:
            return {"variant": None, "reason": f"release.pick {pick!r} was not validated (not a variant)"}
        if pick not in passing:
            return {"variant": None, "reason": f"release.pick {pick!r} fails its gates: {failures(pick)}"}
        return {"variant": pick, "reason": f"named by release.pick; {describe(pick)}"}
    if not passing:
        detail = " | ".join(f"{name}: {failures(name)}" for name in variants)
        return {"variant": None, "reason": f"no variant passes all gates: {detail}"}
    # A variant that passes everything beats any faster one whose speed is not proven; the reason
    # says which were passed over as inconclusive.
    timed = [name for name in passing if key in (variants[name].get("latency") or {})]
    if not timed:
        return {"variant": None, "reason": f"no passing variant was timed at {key}"}
    fastest = min(timed, key=lambda name: variants[name]["latency"][key]["p50_ms"])
    p50 = variants[fastest]["latency"][key]["p50_ms"]
    unproven = [
        name
        for name in variants
        if name not in passing
        and all(c.status != "fail" for c in results[name])
        and ((variants[name].get("latency") or {}).get(key) or {}).get("p50_ms", float("inf")) < p50
    ]
    passed_over = f"; faster but inconclusive, so not released: {', '.join(unproven)}" if unproven else ""
    return {"variant": fastest, "reason": f"fastest within all gates; {describe(fastest)}{passed_over}"}
