"""Automatic exclusion: keep in float the nodes that cost the task metric most, until it holds.

1. Rank (one fp32 pass): every candidate node's input is recorded over the tune examples and scored
   by max |x| / std(x), how far its range is from the bulk that one INT8 scale must cover. Measured
   on the default recipe (MiniLM, WNUT-16): this ranks nodes like their effect on agreement with
   fp32 (Spearman 0.64), as well as quantizing each node alone and comparing logits (0.60) at a
   fraction of the cost; single-node effects on entity F1 itself are below its noise on a few
   hundred tweets, so no per-node ranking can be scored on F1 directly.
2. Decide (on the task metric): worst first, one more node is kept in float, the whole model is
   quantized again and scored on the tune split with the task's headline metric, until its drop vs
   the fp32 input is within the target or the budget of nodes is spent. Every step is recorded.

Quantizing is delegated to `quantize_fn(out_path, nodes_to_quantize, nodes_to_exclude)` and scoring
to `score(model_path) -> metric`, so the same search serves static and dynamic quantization and
every task.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

QuantizeFn = Callable[[Path, "list[str] | None", "list[str] | None"], Path]
RANGE_METHOD = "max |input| / std(input) over the tune examples, one fp32 pass"


def input_ranges(
    model_path: Path, feeds: Sequence[dict[str, np.ndarray]], nodes: Sequence[str]
) -> dict[str, float]:
    """max |x| / std(x) of each node's first input over `feeds` (higher = harder to quantize)."""
    import onnx

    from pipeline.onnx.session import open_session

    model = onnx.load(str(model_path), load_external_data=True)
    inputs = {node.name: node.input[0] for node in model.graph.node if node.name in set(nodes)}
    present = {o.name for o in model.graph.output}
    for tensor in dict.fromkeys(inputs.values()):
        if tensor not in present:
            model.graph.output.append(
                onnx.helper.make_tensor_value_info(tensor, onnx.TensorProto.FLOAT, None)
            )
    with tempfile.TemporaryDirectory(prefix="ranges-") as scratch:
        path = Path(scratch) / "probe.onnx"
        onnx.save_model(model, str(path), save_as_external_data=True, location="probe.onnx.data")
        session = open_session(path)
        names = list(dict.fromkeys(inputs.values()))
        peak = dict.fromkeys(names, 0.0)
        total, squares, count = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0.0), dict.fromkeys(names, 0)
        for feed in feeds:
            for name, value in zip(names, session.run(names, feed), strict=True):
                value = np.asarray(value, dtype=np.float64)
                peak[name] = max(peak[name], float(np.abs(value).max()))
                total[name] += float(value.sum())
                squares[name] += float((value * value).sum())
                count[name] += value.size
        del session
    scores = {}
    for node, tensor in inputs.items():
        mean = total[tensor] / max(count[tensor], 1)
        std = max(squares[tensor] / max(count[tensor], 1) - mean * mean, 0.0) ** 0.5
        scores[node] = round(peak[tensor] / std, 4) if std > 0 else 0.0
    return scores


def greedy_exclusion(
    order: Sequence[str],
    quantize_fn: QuantizeFn,
    score: Callable[[Path], float],
    drop_of: Callable[[float], float],
    work: Path,
    *,
    base_exclude: Sequence[str],
    max_nodes: int,
    max_drop: float,
) -> dict[str, Any]:
    """Keep nodes of `order` in float one at a time until `drop_of(metric) <= max_drop`.

    Returns {"excluded", "steps", "target_met"}: step 0 is the model with nothing auto-excluded;
    each step records the node added, the metric, its drop and the seconds it took.
    """
    excluded: list[str] = []
    steps = []
    for count in range(0, min(max_nodes, len(order)) + 1):
        if count:
            excluded = list(order[:count])
        started = time.perf_counter()
        path = quantize_fn(work / f"excluded_{count}.onnx", None, [*base_exclude, *excluded] or None)
        metric = score(path)
        _remove_model(path)
        drop = drop_of(metric)
        steps.append(
            {
                "excluded": count,
                "node": excluded[-1] if count else None,
                "metric": round(metric, 6),
                "drop": round(drop, 6),
                "seconds": round(time.perf_counter() - started, 2),
            }
        )
        if drop <= max_drop + 1e-12:
            return {"excluded": excluded, "steps": steps, "target_met": True}
    return {"excluded": excluded, "steps": steps, "target_met": False}


def _remove_model(path: Path) -> None:
    for item in Path(path).parent.glob(Path(path).name + "*"):
        item.unlink(missing_ok=True)
