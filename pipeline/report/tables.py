"""The report's tables as rows of text cells: one source for report.md and report.html."""

from __future__ import annotations

from typing import Any


def num(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def mb(value: Any) -> str:
    return "-" if value is None else f"{value / 1e6:.1f} MB"


def latency_keys(report: dict[str, Any]) -> list[str]:
    return list(report["baseline"].get("latency") or {})


def summary_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The main table: one row per candidate (PyTorch first), shared by markdown and HTML."""
    keys = latency_keys(report)
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
            num(base.get("metric")),
            "-",
            "-",
            *[num((base["latency"].get(k) or {}).get("p50_ms"), 2) for k in keys],
            *["1.00x" for _ in keys],
            mb(base.get("size_bytes")),
            mb(base.get("peak_rss_bytes")),
            "-",
        ]
    ]
    for name, variant in report["variants"].items():
        checks = {
            n.split("/", 1)[1]: g for n, g in report.get("gates", {}).items() if n.split("/", 1)[0] == name
        }
        failed = [check for check, g in checks.items() if _status(g) == "fail"]
        undecided = [check for check, g in checks.items() if _status(g) == "inconclusive"]
        gates = "-" if not checks else ("pass" if not failed and not undecided else "")
        if failed:
            gates = "FAIL: " + ", ".join(failed)
        if undecided:
            gates += ("; " if gates else "") + "INCONCLUSIVE: " + ", ".join(undecided)
        speed = variant.get("speedup_vs_pytorch") or {}
        intervals = variant.get("speedup_ci") or {}
        rows.append(
            [
                name + (" (released)" if name == released else ""),
                num(variant.get("metric")),
                num(variant.get("metric_drop")),
                num(variant.get("agreement")),
                *[num((variant["latency"].get(k) or {}).get("p50_ms"), 2) for k in keys],
                *[_speedup(speed.get(k), intervals.get(k)) for k in keys],
                mb(variant.get("size_bytes")),
                mb(variant.get("peak_rss_bytes")),
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
                    num(stats.get("p50_ms"), 3),
                    num(stats.get("p90_ms"), 3),
                    num(stats.get("p99_ms"), 3),
                    num(stats.get("throughput_per_s"), 1),
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
            _status(g).upper() if _status(g) != "pass" else "pass",
            num(g.get("value")),
            num(g.get("limit")),
            g.get("detail", ""),
        ]
        for name, g in (report.get("gates") or {}).items()
    ]
    return ["check", "result", "value", "limit", "detail"], rows


def machine_line(report: dict[str, Any]) -> str:
    machine = report.get("machine") or {}
    flags = [k for k, v in (machine.get("flags") or {}).items() if v]
    settings = report.get("settings", {})
    lat = settings.get("latency", {})
    prefill = f" ({lat['prefill_iters']} of the prefill)" if lat.get("prefill_iters") else ""
    return (
        f"{machine.get('cpu_model', '?')} ({machine.get('cores', '?')} cores; "
        f"{', '.join(flags) or 'no INT8 flags'}), "
        f"onnxruntime {machine.get('ort_version', '?')}; {lat.get('threads', '?')} thread(s), "
        f"warm-up {lat.get('warmup', '?')}, {lat.get('iters', '?')} timed runs per shape{prefill}, "
        "interleaved"
    )


def _status(gate: dict[str, Any]) -> str:
    return gate.get("status") or ("pass" if gate["passed"] else "fail")


def _speedup(ratio: float | None, interval: list[float] | None) -> str:
    """'6.67x [6.10, 7.20]': the ratio and its confidence interval, when there is one."""
    if ratio is None:
        return "-"
    return f"{ratio:.2f}x" + (f" [{interval[0]:.2f}, {interval[1]:.2f}]" if interval else "")


def search_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]] | None:
    """The search trail: every candidate tried (tune metric, drop, speed, cost), then those not built."""
    search = report.get("search")
    if not search:
        return None
    keys = latency_keys(report)
    header = [
        "candidate",
        "steps",
        f"{search.get('metric_name', 'metric')} (tune)",
        "drop",
        "within budget",
        *[f"p50 ms {k}" for k in keys],
        *[f"speed-up {k}" for k in keys],
        "cost s",
    ]
    rows = []
    for name, entry in (search.get("candidates") or {}).items():
        rows.append(
            [
                name + (" (winner)" if name == search.get("winner") else ""),
                " -> ".join(entry.get("steps") or []) or "-",
                num(entry.get("metric")),
                num(entry.get("drop")),
                "yes" if entry.get("within_budget") else "no",
                *[num((entry.get("latency_p50_ms") or {}).get(k), 2) for k in keys],
                *[
                    _speedup(
                        (entry.get("speedup_vs_pytorch") or {}).get(k), (entry.get("speedup_ci") or {}).get(k)
                    )
                    for k in keys
                ],
                num(entry.get("cost_s"), 1),
            ]
        )
    for name, why in (search.get("not_built") or {}).items():
        rows.append([name, why, *["-"] * (len(header) - 2)])
    return header, rows


def adapter_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]] | None:
    """Per variant with LoRA adapters: perplexity (the metric) of the base and of each adapter on
    every label's eval texts, and each adapter's ONNX Runtime vs PyTorch parity and file size."""
    rows: list[list[str]] = []
    labels: list[str] = []
    for name, variant in report["variants"].items():
        adapters = variant.get("adapters") or {}
        matrix = adapters.get("perplexity") or {}
        if not matrix:
            continue
        labels = labels or list(matrix.get("base") or {})
        parity = adapters.get("parity_max_abs_diff") or {}
        sizes = adapters.get("adapter_bytes") or {}
        for active, scores in matrix.items():
            rows.append(
                [
                    name,
                    "none (base)" if active == "base" else active,
                    *[num(scores.get(label), 2) for label in labels],
                    "-" if active == "base" else f"{parity.get(active, float('nan')):.2e}",
                    "-" if active == "base" else mb(sizes.get(active)),
                ]
            )
    if not rows:
        return None
    header = [
        "variant",
        "adapter",
        *[f"perplexity on {label}" for label in labels],
        "parity vs PyTorch",
        "size",
    ]
    return header, rows
