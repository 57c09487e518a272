"""Stage registry: every stage is a function with a typed config, registered by name.

A stage reads files, writes files into an empty folder, and returns metrics. The runner (not the
stage) does caching, manifests and atomic publication. Stage modules keep heavy imports (torch,
onnxruntime) inside their functions so that `python -m pipeline check` stays fast.

Artifact kinds that flow between stages:
- "hf":   a Hugging Face checkpoint folder (config.json, model.safetensors, tokenizer files).
- "onnx": a folder with model.onnx (+ model.onnx.data when external), config.json and the
          tokenizer files copied from upstream, so every ONNX folder is self-contained.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel

from pipeline.errors import RecipeError

if TYPE_CHECKING:
    from pipeline.data import DataBundle
    from pipeline.recipe import Recipe

ArtifactKind = Literal["hf", "onnx"]


@dataclass(frozen=True)
class StageContext:
    """What a stage gets: its config, where to read, where to write, and the recipe around it."""

    config: Any  # the stage's pydantic config, defaults filled in
    recipe: Recipe
    input_dir: Path  # upstream artifact folder (kind given by the stage's `consumes`)
    output_dir: Path  # empty temporary folder; everything the stage writes goes here
    data: DataBundle  # lazy access to the recipe's train/eval/calibration splits
    machine: dict[str, Any]  # machine fingerprint (pipeline.fingerprint.machine_fingerprint)
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("pipeline"))
    # Folder of the model before any variant-specific step (the fine-tuned or source checkpoint);
    # pruning recovery distils from it, quantization compares against it.
    reference_hf_dir: Path | None = None
    # Folder of the plain fp32 ONNX export of the same model (None before export exists).
    reference_onnx_dir: Path | None = None


StageFn = Callable[[StageContext], dict[str, Any]]


@dataclass(frozen=True)
class StageSpec:
    """A registered stage."""

    name: str
    config_cls: type[BaseModel]
    fn: StageFn
    consumes: ArtifactKind
    produces: ArtifactKind
    # Data splits the stage reads (or a function of its config returning them); their content
    # hashes go into the cache key, so a stage re-runs when data it reads changes, and only then.
    data_splits: tuple[str, ...] | Callable[[Any], tuple[str, ...]] = ()
    description: str = ""

    def splits(self, config: BaseModel) -> tuple[str, ...]:
        """The data splits this stage reads with `config`."""
        return tuple(self.data_splits(config) if callable(self.data_splits) else self.data_splits)


_STAGES: dict[str, StageSpec] = {}

# Modules that register stages; imported on first lookup (the Olive pattern: import when used).
_STAGE_MODULES = (
    "pipeline.stages.finetune",
    "pipeline.stages.prune",
    "pipeline.stages.export",
    "pipeline.stages.optimize",
    "pipeline.stages.quantize",
)


def stage(
    name: str,
    *,
    config: type[BaseModel],
    consumes: ArtifactKind,
    produces: ArtifactKind,
    data_splits: tuple[str, ...] | Callable[[Any], tuple[str, ...]] = (),
) -> Callable[[StageFn], StageFn]:
    """Register `fn` as the stage `name`."""

    def register(fn: StageFn) -> StageFn:
        if name in _STAGES:
            raise ValueError(f"stage {name!r} registered twice")
        _STAGES[name] = StageSpec(
            name=name,
            config_cls=config,
            fn=fn,
            consumes=consumes,
            produces=produces,
            data_splits=data_splits,
            description=(fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else "",
        )
        return fn

    return register


def _load_all() -> None:
    for module in _STAGE_MODULES:
        importlib.import_module(module)


def get_stage(name: str) -> StageSpec:
    """The stage called `name`; an unknown name fails listing the known ones."""
    _load_all()
    try:
        return _STAGES[name]
    except KeyError:
        known = ", ".join(sorted(_STAGES))
        raise RecipeError(f"unknown stage {name!r}; known stages: {known}") from None


def all_stages() -> dict[str, StageSpec]:
    _load_all()
    return dict(_STAGES)
