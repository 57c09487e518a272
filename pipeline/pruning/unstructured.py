"""Unstructured L1-magnitude pruning: zero the smallest weights of the blocks' Linear layers.

The zeros stay dense in the saved checkpoint and in the ONNX graph, so ONNX Runtime runs exactly
as many multiply-adds as before: no speed-up, and the same file size. Only a compressed copy (gzip)
gets smaller. Structured pruning (`pipeline.pruning.structured`) is what makes a model faster.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pipeline.errors import InputError
from pipeline.pruning.arch import blocks

TARGETS = ("attention", "ffn")

ORT_NOTE = (
    "unstructured zeros stay dense in the checkpoint and the ONNX graph: ONNX Runtime gets no "
    "speed-up and the file size is unchanged; only the gzip-compressed size drops (DESIGN.md §7)"
)


def select_linears(model: Any, targets: Iterable[str] = TARGETS) -> dict[str, Any]:
    """Name -> Linear (or GPT-2 Conv1D) of the chosen parts ('attention', 'ffn') of every block."""
    targets = tuple(targets)
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown or not targets:
        raise InputError(
            f"prune.targets: expected a non-empty subset of {list(TARGETS)}, got {list(targets)}"
        )
    chosen: dict[str, Any] = {}
    for block in blocks(model, structured=False):
        if "attention" in targets:
            chosen.update(block.attention_linears)
        if "ffn" in targets:
            chosen.update(block.ffn_linears)
    return chosen


def make_permanent(modules: Iterable[Any]) -> None:
    """Bake pruning masks into the weights (weight = weight_orig * mask) and drop the re-parametrisation."""
    from torch.nn.utils import prune

    for module in modules:
        if prune.is_pruned(module):
            prune.remove(module, "weight")


def apply_magnitude_masks(
    model: Any, amount: float, *, targets: Iterable[str] = TARGETS, scope: str = "global"
) -> dict[str, Any]:
    """Mask the smallest-|w| weights so that exactly round(amount * n) of them are zero.

    scope "global" ranks all chosen weights together (layers end up with different sparsities);
    "layer" prunes every chosen Linear to `amount` on its own. The masks stay as a
    torch.nn.utils.prune re-parametrisation (so fine-tuning keeps the zeros) until
    `make_permanent` is called. Weights already zero (an earlier, baked step) count as pruned
    first, so calling this again with a larger amount continues an iterative schedule.
    Returns the chosen modules by name.
    """
    from torch.nn.utils import prune

    if not 0.0 <= amount < 1.0:
        raise InputError(f"prune.amount: expected 0 <= amount < 1, got {amount}")
    if scope not in ("global", "layer"):
        raise InputError(f"prune.scope: expected 'global' or 'layer', got {scope!r}")
    modules = select_linears(model, targets)
    make_permanent(modules.values())  # start from plain weights (zeros of earlier steps included)
    if amount == 0.0:
        return modules
    if scope == "global":
        total = sum(m.weight.numel() for m in modules.values())
        prune.global_unstructured(
            [(m, "weight") for m in modules.values()],
            pruning_method=prune.L1Unstructured,
            amount=int(round(amount * total)),
        )
    else:
        for module in modules.values():
            prune.l1_unstructured(module, "weight", amount=int(round(amount * module.weight.numel())))
    return modules


def sparsity_report(modules: dict[str, Any]) -> dict[str, Any]:
    """Measured fraction of exactly-zero weights, per module and over all of them."""
    import torch

    per_layer: dict[str, float] = {}
    zeros = total = 0
    with torch.no_grad():
        for name, module in modules.items():
            weight = module.weight  # with an active mask this is weight_orig * mask
            z = int((weight == 0).sum())
            per_layer[name] = round(z / weight.numel(), 6)
            zeros += z
            total += weight.numel()
    return {
        "total": round(zeros / total, 6) if total else 0.0,
        "zero_weights": zeros,
        "target_weights": total,
        "per_layer": per_layer,
    }
