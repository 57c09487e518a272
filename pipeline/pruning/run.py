"""The prune stage's work: load, prune (one shot), recover, save, verify, measure.

An iterative schedule (prune 25%, recover 1 epoch, prune to 50%, recover 1 epoch) was measured on
MiniLM / WNUT-16 FFN-50% against one-shot with the same 2 recovery epochs (both distilled): entity
F1 0.405 vs 0.416, so only one-shot is offered.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from pipeline.pruning.arch import blocks, num_heads
from pipeline.pruning.checkpoint import check_reload, save_checkpoint
from pipeline.pruning.metrics import count_parameters, gzip_bytes
from pipeline.pruning.structured import (
    attention_shape,
    ffn_neurons_to_drop,
    heads_to_drop,
    prune_ffn,
    prune_heads,
)
from pipeline.pruning.unstructured import ORT_NOTE, apply_magnitude_masks, make_permanent, sparsity_report

WEIGHTS = "model.safetensors"


def run_prune(
    config: Any,
    *,
    input_dir: Path,
    output_dir: Path,
    task: Any,
    model: Any,
    finetune: Any,
    data: Any,
    reference_hf_dir: Path | None,
    log: logging.Logger | None = None,
) -> dict[str, Any]:
    """Prune the checkpoint in `input_dir` per `config` (a PruneConfig) into `output_dir`.

    `task`: the Task; `model`: the recipe's model section; `finetune`: the recipe's finetune
    section (None: FinetuneConfig's defaults), the training settings recovery starts from."""
    from pipeline.pruning import recovery

    spec = model
    log = log or logging.getLogger("pipeline.prune")
    started = time.perf_counter()
    recover = config.recover_epochs > 0
    session = None
    if recover:
        session = recovery.RecoverySession(
            config,
            task=task,
            max_length=spec.max_length,
            finetune=finetune,
            data=data,
            input_dir=input_dir,
            reference_hf_dir=reference_hf_dir,
            log=log,
        )
        model = session.load_student()
    else:
        model = task.load_model(input_dir, trust_remote_code=spec.trust_remote_code, require_head=False)
    model = model.float().eval()
    blocks(model, structured=config.kind != "unstructured")  # fails early on an unsupported model
    params_before = count_parameters(model)
    metrics: dict[str, Any] = {
        "kind": config.kind,
        "model_type": model.config.model_type,
        "params_before": params_before,
    }
    if session is not None:
        session.load_teacher(model)
        metrics["metric_name"] = session.metric_name
        metrics["metric_dense"] = session.evaluate(model)

    modules: dict[str, Any] = {}
    masks: dict[str, Any] = {}
    if config.kind == "unstructured":
        modules = apply_magnitude_masks(model, config.amount, targets=config.targets, scope=config.scope)
        masks = {n: m.weight_mask.detach().clone() for n, m in modules.items() if hasattr(m, "weight_mask")}
    elif config.kind == "ffn":
        width = blocks(model, structured=True)[0].up.out_features
        metrics.update(prune_ffn(model, ffn_neurons_to_drop(width, config.amount)))
    else:
        current = num_heads(model, blocks(model, structured=True)[0])
        drop = heads_to_drop(current, heads_per_layer=config.heads_per_layer, amount=config.amount)
        metrics.update(prune_heads(model, drop))
    log.info("pruned (%s): %d -> %d parameters", config.kind, params_before, count_parameters(model))

    if session is not None:
        metrics["metric_pruned"] = session.evaluate(model)  # right after pruning, before recovery
        model, trained = session.train(model)  # unstructured: the masks stay active while training
        metrics["recover_best_epoch"] = trained["best_epoch"]
        metrics["recover_history"] = trained["history"]
        metrics["recover_method"] = trained["method"]
        metrics["recover_trainable_parameters"] = trained["trainable_parameters"]
        if "merge_max_abs_diff" in trained:
            metrics["recover_merge_max_abs_diff"] = trained["merge_max_abs_diff"]

    if config.kind == "unstructured":
        modules = dict(_named(model, modules))
        make_permanent(modules.values())
        _reapply(modules, masks)  # exact zeros even if recovery handed back a model without the masks
        report = sparsity_report(modules)
        metrics["sparsity"] = report["total"]
        metrics["sparsity_per_layer"] = report["per_layer"]
        metrics["zero_weights"] = report["zero_weights"]
        metrics["target_weights"] = report["target_weights"]
        metrics["targets"] = list(config.targets)
        metrics["scope"] = config.scope
        metrics["ort_note"] = ORT_NOTE
    elif config.kind == "heads":
        heads, attention_hidden = attention_shape(model.config)
        metrics["heads_after"] = heads
        metrics["attention_hidden_size"] = attention_hidden
        metrics["pruned_heads"] = {str(k): sorted(v) for k, v in sorted(model.config.pruned_heads.items())}

    model.eval()
    metrics["params_after"] = count_parameters(model)
    metrics["param_reduction"] = round(1 - metrics["params_after"] / params_before, 6)
    if session is not None:
        metrics["metric_recovered"] = session.evaluate(model)
        metrics["distill"] = config.distill

    save_checkpoint(model, input_dir, output_dir)
    metrics["reload_max_abs_diff"] = check_reload(model, output_dir)
    metrics["safetensors_bytes"] = (output_dir / WEIGHTS).stat().st_size
    metrics["safetensors_gzip_bytes"] = gzip_bytes(output_dir / WEIGHTS)
    if config.kind == "unstructured" and (input_dir / WEIGHTS).is_file():
        metrics["input_safetensors_gzip_bytes"] = gzip_bytes(input_dir / WEIGHTS)
    metrics["duration_s"] = round(time.perf_counter() - started, 3)
    return metrics


def _named(model: Any, modules: dict[str, Any]) -> list[tuple[str, Any]]:
    """The pruned modules as they are in `model` now (recovery may hand back another object)."""
    lookup = dict(model.named_modules())
    return [(name, lookup[name]) for name in modules if name in lookup]


def _reapply(modules: dict[str, Any], masks: dict[str, Any]) -> None:
    import torch

    with torch.no_grad():
        for name, module in modules.items():
            if name in masks:
                module.weight.mul_(masks[name].to(module.weight.dtype))
