"""Inputs checked before the first stage runs: a bad input costs a second, not a run.

Everything a recipe points at is opened once, up front: the model folder and its tokenizer, every
configured data split (it exists, parses, is not empty, fits the task), the labels of the data
against the model's head when nothing fine-tunes it, tune and calibration data disjoint from eval
(by content hash), the parity and timing shapes against the
model's positions, the metric against the task, and the architectures the pruning and fusion
steps support. The first problem is one line naming the field (RecipeError/InputError: exit 2),
raised before anything is written under exported/, also with `--until`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.config import Recipe
from pipeline.errors import InputError, RecipeError


def preflight(recipe: Recipe, source_dir: Path, data: Any, task: Any) -> list[str]:
    """Check `recipe`'s inputs (model folder `source_dir`, its DataBundle `data`, its Task); returns
    the notes the report must carry (an overlap the recipe allowed)."""
    from pipeline.onnx.io import read_config
    from pipeline.tasks import load_tokenizer

    config = read_config(source_dir)
    model_type = config.get("model_type")
    load_tokenizer(source_dir, recipe.model.trust_remote_code)  # InputError naming the folder
    _check_positions(recipe, config)
    for split in ("train", "tune", "eval", "calibration"):
        if data.has(split):
            data.get(split)  # exists, parses, not empty, fits the task: InputError naming data.<split>
    overlaps = data_overlaps(recipe, data)
    if recipe.data.eval is not None:
        from pipeline.stages.validate import check_metric

        check_metric(task, recipe.validate_)
    if recipe.finetune is None and task.head_suffix is not None:
        architectures = config.get("architectures") or []
        if not any(a.endswith(task.head_suffix) for a in architectures):
            raise InputError(
                f"model.source: {source_dir} ({', '.join(architectures) or 'no architectures'}) has no "
                f"{task.name} head; add a finetune section to train one"
            )
        id2label = config.get("id2label") or {}
        # train's labels matter only where a stage learns from them (a pruning recovery).
        for split in ("eval", "tune", "train") if recipe.trains() else ("eval", "tune"):
            if data.has(split):
                task.check_labels(id2label, data.get(split), where=f"data.{split}")
    _check_steps(recipe, model_type)
    _check_calibration(recipe, data)
    if recipe.finetune is not None and not data.has("tune") and data.has("eval"):
        overlaps.append(
            "the fine-tune kept its best epoch by its score on data.eval (the recipe has no data.tune): "
            "the eval figures are the best of several looks at the eval set, slightly optimistic"
        )
    return overlaps


def data_overlaps(recipe: Recipe, data: Any) -> list[str]:
    """Tune or calibration examples that are eval examples (content hashes): an InputError naming
    both splits, or, with data.allow_overlap, the notes the report carries."""
    notes = []
    if not data.has("eval"):
        return notes
    for split in ("tune", "calibration"):
        if not data.has(split):
            continue
        shared = data.overlap(split, "eval")
        if not shared:
            continue
        text = (
            f"data.{split} and data.eval share {shared} of {len(data.get(split))} examples (equal content): "
            f"choices made on {split} data then measure the eval set they are reported on"
        )
        if not recipe.data.allow_overlap:
            raise InputError(text + "; use disjoint data, or set data.allow_overlap: true")
        notes.append(text + " (allowed by data.allow_overlap)")
    return notes


def _check_positions(recipe: Recipe, config: dict[str, Any]) -> None:
    """Shapes longer than the model's position table fail in the middle of a stage otherwise."""
    positions = config.get("max_position_embeddings") or config.get("n_positions")
    if not isinstance(positions, int):
        return
    parity = recipe.export.parity
    longest = max(s[1] for s in parity.shapes)
    what = "export.parity.shapes"
    if recipe.model.task == "text-generation":  # one decode step after each past length
        pasts = parity.past_lens or [s[1] for s in parity.shapes]
        if max(pasts) + 1 > longest:
            longest, what = max(pasts) + 1, "export.parity.past_lens"
    if longest > positions:
        raise RecipeError(
            f"{what}: a sequence of {longest} tokens exceeds the model's max_position_embeddings {positions}"
        )
    longest_timed = max(recipe.validate_.latency.seq_lens)
    if recipe.data.eval is not None and longest_timed > positions:
        raise RecipeError(
            f"validate.latency.seq_lens: {longest_timed} exceeds the model's max_position_embeddings "
            f"{positions}"
        )


def _check_calibration(recipe: Recipe, data: Any) -> None:
    """Static INT8 and GPTQ calibrate on data.calibration: a recipe without it (a decoder recipe has
    no train split to draw the default from) stops here, not after its export ran."""
    from pipeline.config.quantize import QuantizeConfig

    if data.has("calibration"):
        return
    for name, steps in recipe.variants.items():
        for index, step in enumerate(steps):
            if step.stage == "quantize" and QuantizeConfig.model_validate(step.config).reads_calibration():
                what = "static" if step.config.get("mode") == "static" else "gptq"
                raise RecipeError(
                    f"variants.{name}.{index}.quantize: {what} calibrates on data.calibration, which "
                    "this recipe lacks (give it its own source, or a train split to draw from)"
                )


def _check_steps(recipe: Recipe, model_type: str | None) -> None:
    """Steps the model's architecture does not support, named before any of them runs."""
    from pipeline.pruning.arch import STRUCTURED_TYPES, UNSTRUCTURED_TYPES
    from pipeline.stages.optimize import MODEL_TYPES

    for name, steps in recipe.variants.items():
        for index, step in enumerate(steps):
            where = f"variants.{name}.{index}.{step.stage}"
            if step.stage == "prune":
                supported = STRUCTURED_TYPES if step.config["kind"] != "unstructured" else UNSTRUCTURED_TYPES
                if model_type not in supported:
                    raise RecipeError(
                        f"{where}.kind: {step.config['kind']} pruning does not support model_type "
                        f"{model_type!r}; supported: {', '.join(supported)}"
                    )
            if (
                step.stage == "optimize"
                and step.config.get("model_type") is None
                and model_type not in MODEL_TYPES
            ):
                raise RecipeError(
                    f"{where}: the optimize stage has no fusions for model_type {model_type!r}; "
                    f"supported: {', '.join(sorted(MODEL_TYPES))} (or set optimize.model_type)"
                )
