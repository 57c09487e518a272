"""Stage registry: every stage is a function with a typed config, registered by name.

A stage reads files, writes files into an empty folder, and returns metrics. The runner (not the
stage) does caching, manifests and atomic publication. A stage receives its own section plus what
it declares it reads, and nothing else, so that its cache key can be built from exactly that:
- `data_splits`: the data splits it reads (or a function of its config returning them);
- `sections`: other recipe sections it reads (e.g. "export.parity" for its parity shapes), or a
  function of its config returning them;
- `machine_facts`: a function of (config, machine fingerprint) returning the machine facts its
  output depends on (e.g. the INT8 types this CPU runs fast), or None.
The model section (task, max_length, trust_remote_code) is read by every stage.

Artifact kinds that flow between stages:
- "hf":       a Hugging Face checkpoint folder (config.json, model.safetensors, tokenizer files).
- "onnx":     a folder with model.onnx (+ model.onnx.data when external), config.json and the
              tokenizer files copied from upstream, so every ONNX folder is self-contained.
- "variants": every variant's final artifact (validate reads them all).
- "report":   measurements for the report (validate writes them).
Stage modules keep heavy imports (torch, onnxruntime) inside their functions so that
`python -m pipeline check` stays fast.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from pipeline.config.model import ModelSpec
from pipeline.errors import RecipeError

ArtifactKind = Literal["hf", "onnx", "variants", "report"]
# Recipe sections a stage may declare it reads besides its own.
SECTIONS = ("export.parity", "finetune", "gates", "validate", "release")


@dataclass(frozen=True)
class StageContext:
    """What a stage gets: its config, its task, what it declared it reads, where to read and write."""

    config: Any  # the stage's pydantic config, defaults filled in
    model: ModelSpec  # the recipe's model section (task, max_length, trust_remote_code)
    task: Any  # the pipeline.tasks.Task of model.task
    input_dir: Path  # upstream artifact folder (kind given by the stage's `consumes`)
    output_dir: Path  # empty temporary folder; everything the stage writes goes here
    data: Any  # the declared data splits only (pipeline.data.DataBundle.view)
    machine: Mapping[str, Any] = field(default_factory=dict)  # the declared machine facts only
    sections: Mapping[str, Any] = field(default_factory=dict)  # the declared other sections only
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("pipeline"))
    # Folder of the model before any variant-specific step (the fine-tuned or source checkpoint);
    # pruning recovery distils from it.
    reference_hf_dir: Path | None = None
    # validate only: variant name -> (final artifact folder, the manifests of its chain).
    variants: Mapping[str, tuple[Path, list[dict[str, Any]]]] = field(default_factory=dict)


StageFn = Callable[[StageContext], dict[str, Any]]


@dataclass(frozen=True)
class StageSpec:
    """A registered stage."""

    name: str
    config_cls: type[BaseModel]
    fn: StageFn
    consumes: ArtifactKind
    produces: ArtifactKind
    data_splits: tuple[str, ...] | Callable[[Any], tuple[str, ...]] = ()
    sections: tuple[str, ...] | Callable[[Any], tuple[str, ...]] = ()
    machine_facts: Callable[[Any, dict[str, Any]], dict[str, Any]] | None = None
    description: str = ""

    def splits(self, config: BaseModel) -> tuple[str, ...]:
        """The data splits this stage reads with `config`."""
        return tuple(self.data_splits(config) if callable(self.data_splits) else self.data_splits)

    def reads(self, config: BaseModel) -> tuple[str, ...]:
        """The other recipe sections this stage reads with `config`."""
        return tuple(self.sections(config) if callable(self.sections) else self.sections)

    def facts(self, config: BaseModel, fingerprint: dict[str, Any]) -> dict[str, Any]:
        """The machine facts this stage's output depends on with `config`."""
        return dict(self.machine_facts(config, fingerprint)) if self.machine_facts else {}


_STAGES: dict[str, StageSpec] = {}

# Modules that register stages; imported on first lookup (the Olive pattern: import when used).
_STAGE_MODULES = (
    "pipeline.stages.finetune",
    "pipeline.stages.prune",
    "pipeline.stages.export",
    "pipeline.stages.optimize",
    "pipeline.stages.quantize",
    "pipeline.stages.adapters",
    "pipeline.stages.search",
    "pipeline.stages.validate",
)


def stage(
    name: str,
    *,
    config: type[BaseModel],
    consumes: ArtifactKind,
    produces: ArtifactKind,
    data_splits: tuple[str, ...] | Callable[[Any], tuple[str, ...]] = (),
    sections: tuple[str, ...] | Callable[[Any], tuple[str, ...]] = (),
    machine_facts: Callable[[Any, dict[str, Any]], dict[str, Any]] | None = None,
) -> Callable[[StageFn], StageFn]:
    """Register `fn` as the stage `name`."""
    unknown = [s for s in (() if callable(sections) else sections) if s not in SECTIONS]
    if unknown:
        raise ValueError(f"stage {name!r}: unknown sections {unknown}; known: {SECTIONS}")

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
            sections=sections,
            machine_facts=machine_facts,
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


def run_stage(
    name: str,
    config: Any,
    input_dir: Path,
    output_dir: Path,
    *,
    model: ModelSpec | dict[str, Any],
    data: Any = None,
    fingerprint: dict[str, Any] | None = None,
    sections: Mapping[str, Any] | None = None,
    reference_hf_dir: Path | None = None,
    variants: Mapping[str, tuple[Path, list[dict[str, Any]]]] | None = None,
    log: logging.Logger | None = None,
) -> dict[str, Any]:
    """Run one stage outside a recipe (no cache, no manifest, no atomic publication): for
    notebooks and tests. `config` is the stage's config (or its dict); `data` a DataBundle;
    `sections` the other recipe sections it declares (missing ones are None, export.parity
    defaults to ParityConfig()). Returns the stage's metrics."""
    from pipeline.config.export import ParityConfig
    from pipeline.data import DataBundle
    from pipeline.fingerprint import machine_fingerprint
    from pipeline.tasks import get_task

    spec = get_stage(name)
    config = config if isinstance(config, spec.config_cls) else spec.config_cls.model_validate(config or {})
    model = model if isinstance(model, ModelSpec) else ModelSpec.model_validate(model)
    given = dict(sections or {})
    given.setdefault("export.parity", ParityConfig())
    bundle = data if data is not None else DataBundle(None, model.task)
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    context = StageContext(
        config=config,
        model=model,
        task=get_task(model.task),
        input_dir=Path(input_dir),
        output_dir=Path(output_dir),
        data=bundle.view(spec.splits(config)),
        machine=spec.facts(config, fingerprint or machine_fingerprint()),
        sections={section: given.get(section) for section in spec.reads(config)},
        log=log or logging.getLogger("pipeline"),
        reference_hf_dir=reference_hf_dir,
        variants=variants or {},
    )
    return spec.fn(context) or {}
