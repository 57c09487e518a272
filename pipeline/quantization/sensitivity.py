"""Which quantized nodes hurt the output most, measured on calibration data.

Per-node ablation: quantize ONE candidate node at a time (all others float), run the calibration
examples, and measure the output error against the float model (SQNR in dB: signal power over
error power, higher is better; argmax agreement; max |diff|). The nodes with the lowest SQNR are the
sensitive ones. Excluding the worst k of them from the full quantization is then verified by
quantizing the whole model again and measuring it the same way.

Quantizing is delegated to `quantize_fn(out_path, nodes_to_quantize, nodes_to_exclude)`, so the
same search serves static (calibration ranges computed once and cached) and dynamic quantization.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import InputError

QuantizeFn = Callable[[Path, "list[str] | None", "list[str] | None"], Path]
_SQNR_CAP = 200.0  # dB reported for an error of exactly zero (JSON has no infinity)


def run_feeds(model_path: Path, feeds: Sequence[dict[str, np.ndarray]]) -> list[list[np.ndarray]]:
    """All outputs of `model_path` for each feed (CPU, one thread per op for determinism)."""
    from pipeline.onnx.session import open_session

    session = open_session(model_path)
    names = [o.name for o in session.get_outputs()]
    return [session.run(names, feed) for feed in feeds]


def output_error(reference: list[list[np.ndarray]], actual: list[list[np.ndarray]]) -> dict[str, float]:
    """SQNR (dB), relative MSE, max |diff| and argmax agreement of `actual` vs `reference`."""
    signal = noise = 0.0
    worst = 0.0
    agree = total = 0
    for ref_outputs, act_outputs in zip(reference, actual, strict=True):
        for ref, act in zip(ref_outputs, act_outputs, strict=True):
            ref = np.asarray(ref, dtype=np.float64)
            act = np.asarray(act, dtype=np.float64)
            diff = ref - act
            signal += float(np.sum(ref * ref))
            noise += float(np.sum(diff * diff))
            worst = max(worst, float(np.max(np.abs(diff))) if diff.size else 0.0)
            if ref.ndim >= 2 and ref.shape[-1] > 1:
                same = np.argmax(ref, axis=-1) == np.argmax(act, axis=-1)
                agree += int(same.sum())
                total += int(same.size)
    if noise == 0.0:
        sqnr = _SQNR_CAP
    elif signal == 0.0:
        sqnr = -_SQNR_CAP
    else:
        sqnr = min(_SQNR_CAP, 10.0 * math.log10(signal / noise))
    return {
        "sqnr_db": round(sqnr, 4),
        "rel_mse": noise / signal if signal else math.inf if noise else 0.0,
        "max_abs_diff": worst,
        "argmax_agreement": agree / total if total else 1.0,
    }


def rank_nodes(
    candidates: Sequence[str],
    quantize_fn: QuantizeFn,
    feeds: Sequence[dict[str, np.ndarray]],
    reference: list[list[np.ndarray]],
    workdir: Path,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Each candidate quantized alone, worst (lowest SQNR) first."""
    from tqdm.auto import tqdm

    ranking = []
    for index, node in enumerate(
        tqdm(candidates, desc="node sensitivity", leave=False, disable=not progress)
    ):
        path = quantize_fn(workdir / f"single_{index}.onnx", [node], None)
        error = output_error(reference, run_feeds(path, feeds))
        _remove_model(path)
        ranking.append({"node": node, **error})
    ranking.sort(key=lambda item: (item["sqnr_db"], -item["max_abs_diff"], item["node"]))
    return ranking


def measure_quantized(
    quantize_fn: QuantizeFn,
    feeds: Sequence[dict[str, np.ndarray]],
    reference: list[list[np.ndarray]],
    workdir: Path,
    excluded: Sequence[str],
    name: str,
) -> dict[str, float]:
    """Output error of the whole model quantized with `excluded` kept in float."""
    path = quantize_fn(workdir / f"{name}.onnx", None, list(excluded))
    error = output_error(reference, run_feeds(path, feeds))
    _remove_model(path)
    return error


def target_met(
    error: dict[str, float], min_sqnr_db: float | None, min_argmax_agreement: float | None
) -> bool:
    """Whether `error` meets every target given (True when none is)."""
    return (min_sqnr_db is None or error["sqnr_db"] >= min_sqnr_db) and (
        min_argmax_agreement is None or error["argmax_agreement"] >= min_argmax_agreement
    )


def select_exclusions(
    ranking: list[dict[str, Any]],
    quantize_fn: QuantizeFn,
    feeds: Sequence[dict[str, np.ndarray]],
    reference: list[list[np.ndarray]],
    workdir: Path,
    *,
    before: dict[str, float],
    base_exclude: Sequence[str],
    max_nodes: int,
    min_sqnr_db: float | None = None,
    min_argmax_agreement: float | None = None,
) -> dict[str, Any]:
    """Exclude the most sensitive nodes, up to `max_nodes`.

    `before` is the error with nothing auto-excluded. Without a target, the worst `max_nodes` are
    excluded. With a target (SQNR and/or argmax agreement of the whole quantized model on the
    sensitivity examples) nodes are excluded one at a time, worst first, and the search stops as
    soon as the target is met.
    """
    has_target = min_sqnr_db is not None or min_argmax_agreement is not None
    steps = [{"excluded": 0, **before}]
    order = [item["node"] for item in ranking]
    excluded: list[str] = []
    if has_target:
        for count in range(1, min(max_nodes, len(order)) + 1):
            if target_met(steps[-1], min_sqnr_db, min_argmax_agreement):
                break
            excluded = order[:count]
            error = measure_quantized(
                quantize_fn, feeds, reference, workdir, [*base_exclude, *excluded], f"top_{count}"
            )
            steps.append({"excluded": count, **error})
    else:
        excluded = order[: min(max_nodes, len(order))]
        if excluded:
            error = measure_quantized(
                quantize_fn, feeds, reference, workdir, [*base_exclude, *excluded], "top"
            )
            steps.append({"excluded": len(excluded), **error})
    return {
        "excluded": excluded,
        "before": before,
        "after": steps[-1],
        "steps": steps,
        "target_met": target_met(steps[-1], min_sqnr_db, min_argmax_agreement) if has_target else None,
    }


def _remove_model(path: Path) -> None:
    for item in Path(path).parent.glob(Path(path).name + "*"):
        item.unlink(missing_ok=True)


def auto_exclude(
    config: Any,
    source: Path,
    quantize_fn: Any,
    feeds: list[dict[str, Any]],
    graph_nodes: dict[str, str],
    op_types: list[str] | None,
    work: Path,
    base_exclude: list[str],
) -> dict[str, Any]:
    """Rank candidate nodes by sensitivity on calibration data and exclude the worst (config is
    the QuantizeConfig; its auto_exclude section sets the budget and the targets)."""
    auto = config.auto_exclude
    assert auto is not None
    wanted = set(op_types or ("MatMul", "Gemm", "Attention"))
    candidates = [name for name, op in graph_nodes.items() if op in wanted and name not in base_exclude]
    if not candidates:
        raise InputError(f"quantize.auto_exclude: no {sorted(wanted)} nodes to rank in {source}")
    started = time.perf_counter()
    sample = feeds[: auto.samples]
    reference = run_feeds(source, sample)
    before = measure_quantized(quantize_fn, sample, reference, work, base_exclude, "none")
    if auto.min_sqnr_db is not None or auto.min_argmax_agreement is not None:
        if target_met(before, auto.min_sqnr_db, auto.min_argmax_agreement):
            # Nothing to exclude: skip the per-node ranking altogether.
            ranking: list[dict[str, Any]] = []
            chosen = {"excluded": [], "before": before, "after": before, "steps": [], "target_met": True}
            return _report(ranking, chosen, len(sample), len(candidates), started)
    ranking = rank_nodes(candidates, quantize_fn, sample, reference, work)
    # Nodes that the quantizer skipped anyway (e.g. MatMuls without a constant weight in dynamic
    # mode) come out exact: they cannot be worth a slot in the budget.
    ranking_useful = [item for item in ranking if item["max_abs_diff"] > 0.0]
    chosen = select_exclusions(
        ranking_useful,
        quantize_fn,
        sample,
        reference,
        work,
        before=before,
        base_exclude=base_exclude,
        max_nodes=auto.max_nodes,
        min_sqnr_db=auto.min_sqnr_db,
        min_argmax_agreement=auto.min_argmax_agreement,
    )
    return _report(ranking, chosen, len(sample), len(candidates), started)


def _report(
    ranking: list[dict[str, Any]], chosen: dict[str, Any], samples: int, candidates: int, started: float
) -> dict[str, Any]:
    return {
        "method": "per-node ablation: each candidate quantized alone, output SQNR vs fp32",
        "samples": samples,
        "candidates": candidates,
        "ranking": ranking[:10],
        **chosen,
        "duration_s": round(time.perf_counter() - started, 2),
    }
