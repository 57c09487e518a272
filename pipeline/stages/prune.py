"""Prune stage: magnitude pruning in PyTorch, unstructured or structured (FFN neurons, heads).

Only structured pruning (kind `ffn` or `heads`) makes the exported model smaller and faster in
ONNX Runtime; unstructured zeros keep the dense shapes (DESIGN.md §7) and only shrink the gzip size.
The algorithms live in `pipeline.pruning`; this module reads the checkpoint, prunes it in one shot,
optionally recovers accuracy by fine-tuning (with distillation from the unpruned model), and writes a
normal Hugging Face checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.config.prune import PruneConfig
from pipeline.stages.registry import StageContext, stage


def _splits_read(config: PruneConfig) -> tuple[str, ...]:
    """Recovery trains on train and keeps its best epoch on tune (else eval); one-shot pruning reads
    no data."""
    return ("train", "tune", "eval") if config.recover_epochs else ()


@stage(
    "prune",
    config=PruneConfig,
    consumes="hf",
    produces="hf",
    data_splits=_splits_read,
    sections=("finetune",),  # recovery trains with the fine-tune settings (epochs/lr from here)
)
def prune(ctx: StageContext) -> dict[str, Any]:
    """Prune the model by weight magnitude (unstructured, FFN neurons or heads), optionally recover."""
    from pipeline.pruning.run import run_prune

    return run_prune(
        ctx.config,
        input_dir=Path(ctx.input_dir),
        output_dir=Path(ctx.output_dir),
        task=ctx.task,
        model=ctx.model,
        finetune=ctx.sections["finetune"],
        data=ctx.data,
        reference_hf_dir=ctx.reference_hf_dir,
        log=ctx.log,
    )
