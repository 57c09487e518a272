"""The accuracy-vs-latency chart (matplotlib, Agg) and its Pareto front."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any


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
