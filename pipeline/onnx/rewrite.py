"""What every in-place graph rewrite here ends with: dead nodes and initializers dropped, the
com.microsoft opset declared once a contrib op is in the graph."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def live_nodes(nodes: list[Any], outputs: Iterable[str]) -> list[Any]:
    """The nodes that `outputs` depend on, in their order (dead-code elimination)."""
    needed, kept = set(outputs), []
    for node in reversed(nodes):
        if any(out in needed for out in node.output):
            kept.append(node)
            needed.update(node.input)
    return kept[::-1]


def set_graph_nodes(model: Any, nodes: list[Any]) -> None:
    """`model`'s graph holds the live ones of `nodes` and only the initializers they read; the
    com.microsoft opset is declared when one of them needs it."""
    from onnx import helper

    graph = model.graph
    kept = live_nodes(nodes, [o.name for o in graph.output])
    del graph.node[:]
    graph.node.extend(kept)
    used = {name for node in kept for name in node.input}
    initializers = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    contrib = any(node.domain == "com.microsoft" for node in kept)
    if contrib and not any(opset.domain == "com.microsoft" for opset in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
