"""Recipes: YAML files validated by pydantic models (unknown keys rejected).

`load_recipe(path)` returns a `Recipe` or raises `RecipeError` with one line that names the file,
the field path and what was expected, e.g.
`recipes/x.yaml: export.opset: expected int >= 11, got "18a"`.

Checks that need only the recipe itself run here (cross-section ones included: a gate's shape
must be a measured one, a variant step must apply to the model's task); checks that need the
model, the data or a task's metrics run before the first stage (pipeline.preflight).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from pipeline.config.adapters import AdaptersConfig
from pipeline.config.base import StrictModel, shape_key
from pipeline.config.data import DataConfig
from pipeline.config.export import ExportConfig
from pipeline.config.finetune import FinetuneConfig
from pipeline.config.gates import GatesConfig
from pipeline.config.model import DEFAULT_RELATIVE_DROP, TRAINABLE_TASKS, ModelSpec
from pipeline.config.optimize import OptimizeConfig
from pipeline.config.prune import PruneConfig
from pipeline.config.quantize import QuantizeConfig
from pipeline.config.release import ReleaseConfig
from pipeline.config.search import SearchConfig
from pipeline.config.validate import ValidateConfig
from pipeline.errors import RecipeError

# A recipe name becomes a folder under exported/: letters, digits, '.', '_' and '-', no leading dot.
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
# Steps a variant may list, with their configs; export is implied between the PyTorch steps
# (prune) and the ONNX steps (optimize, quantize).
STEP_CONFIGS: dict[str, type[StrictModel]] = {
    "prune": PruneConfig,
    "optimize": OptimizeConfig,
    "quantize": QuantizeConfig,
    "adapters": AdaptersConfig,
}
VARIANT_STEPS = tuple(STEP_CONFIGS)


class Step(StrictModel):
    """One step of a variant: a stage name and its config (defaults filled in)."""

    stage: str
    config: dict[str, Any]


class Recipe(StrictModel):
    """A whole recipe: one model x task, its data, stages and variants."""

    name: str = Field(description="Output folder name under exported/ (letters, digits, . _ -).")
    description: str = Field("", description="Free text shown in reports.")
    model: ModelSpec
    data: DataConfig = Field(default_factory=DataConfig, description="Where examples come from.")
    finetune: FinetuneConfig | None = Field(
        None, description="Fine-tune the source model first (omit for an already fine-tuned model)."
    )
    export: ExportConfig = Field(default_factory=ExportConfig, description="ONNX export and parity.")
    variants: dict[str, list[Step]] = Field(
        default_factory=lambda: {"fp32": []},
        description="Variant name -> steps after the common prefix: prune, optimize, quantize, adapters.",
    )
    validate_: ValidateConfig = Field(
        default_factory=ValidateConfig, alias="validate", description="Accuracy and speed checks."
    )
    search: SearchConfig | None = Field(
        None,
        description="Search for the fastest model within the accuracy budget (pruning x quantization "
        "candidates scored on the tune split); the winner is validated like a variant.",
    )
    gates: GatesConfig = Field(default_factory=GatesConfig, description="CI limits.")
    release: ReleaseConfig = Field(default_factory=ReleaseConfig, description="Release pick.")

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        if not _SAFE_NAME.match(value) or ".." in value:
            raise ValueError(
                f"expected a folder name of letters, digits, '.', '_' and '-' (no '..'), got {value!r}"
            )
        return value

    @field_validator("variants", mode="before")
    @classmethod
    def _parse_variants(cls, value: Any) -> Any:
        if not isinstance(value, dict) or not value:
            raise ValueError("expected a mapping of variant name -> list of steps")
        return {name: _parse_steps(name, steps) for name, steps in value.items()}

    @model_validator(mode="after")
    def _check_cross_fields(self) -> Recipe:
        for name, steps in self.variants.items():
            if not _SAFE_NAME.match(str(name)):
                raise ValueError(f"variants: variant name {name!r} is not a safe folder name")
            if any(step.stage == "adapters" for step in steps):
                if len(steps) != 1:
                    raise ValueError(
                        f"variants.{name}: adapters must be the variant's only step (they attach to the "
                        "plain export; prune, optimize and quantize would change the layers they adapt)"
                    )
                if self.model.task != "text-generation":
                    raise ValueError(
                        f"variants.{name}.0.adapters: swappable adapters are for text-generation models; "
                        "an encoder trains LoRA with finetune.method: lora (merged)"
                    )
                if self.data.train is None or self.data.eval is None:
                    raise ValueError(f"variants.{name}.0.adapters: needs data.train and data.eval texts")
            seen_onnx = False
            for step in steps:
                if step.stage == "prune" and seen_onnx:
                    raise ValueError(f"variants.{name}: prune must come before optimize/quantize")
                seen_onnx = seen_onnx or step.stage != "prune"
        chains = {**self.variants, **self.search_candidates()}
        needs_train = self.trains()
        if self.finetune is not None and self.model.task not in TRAINABLE_TASKS:
            raise ValueError(
                f"finetune: a {self.model.task} model cannot be fine-tuned here; remove the finetune "
                f"section (trainable: {', '.join(TRAINABLE_TASKS)})"
            )
        if self.export.parity.past_lens is not None and self.model.task != "text-generation":
            raise ValueError("export.parity.past_lens: applies to text-generation models only")
        for field in ("prefill_seq_lens", "prefill_iters"):  # a decoder's prefill timing
            if getattr(self.validate_.latency, field) is not None and self.model.task != "text-generation":
                raise ValueError(f"validate.latency.{field}: applies to text-generation models only")
        if needs_train and self.data.train is None:
            raise ValueError("data.train: required by finetune / pruning recovery, but missing")
        gates = self.gates
        if (
            gates.max_metric_drop is None
            and gates.max_metric_drop_relative is None
            and not gates.allow_any_metric_drop
        ):
            # The task's default limit becomes part of the recipe as applied (reports show it).
            default = {"max_metric_drop_relative": DEFAULT_RELATIVE_DROP[self.model.task]}
            object.__setattr__(self, "gates", gates.model_copy(update=default))
        self._check_search()
        for name, steps in chains.items():
            for index, step in enumerate(steps):
                config = STEP_CONFIGS[step.stage].model_validate(step.config)
                problem = getattr(config, "problem_for_task", lambda task: None)(self.model.task)
                if problem:
                    raise ValueError(f"variants.{name}.{index}.{step.stage}.{problem}")
                auto = getattr(config, "auto_exclude", None)
                if auto is not None:
                    where = f"variants.{name}.{index}.quantize.auto_exclude"
                    if self.data.tune is None:
                        raise ValueError(f"{where}: scores its choices on data.tune, which is not configured")
                    if auto.max_metric_drop is None and self.gates.allow_any_metric_drop:
                        raise ValueError(
                            f"{where}.max_metric_drop: no target (gates.allow_any_metric_drop); set one"
                        )
        self._check_decision_settings()
        return self

    def trains(self) -> bool:
        """Whether a stage learns from data.train's labels (the fine-tune, a pruning recovery);
        otherwise train can only feed a drawn split such as calibration."""
        chains = {**self.variants, **self.search_candidates()}
        return self.finetune is not None or any(
            s.stage == "prune" and s.config.get("recover_epochs", 0) for v in chains.values() for s in v
        )

    def search_candidates(self) -> dict[str, list[Step]]:
        """The search's candidate chains (name -> steps), cheapest first; empty without a search."""
        if self.search is None:
            return {}
        return {name: [Step(**s) for s in steps] for name, steps in self.search.candidates().items()}

    def _check_search(self) -> None:
        search = self.search
        if search is None:
            return
        if self.data.tune is None:
            raise ValueError("search: scores its candidates on data.tune, which is not configured")
        if self.data.eval is None:
            raise ValueError("search: validates its winner on data.eval, which is not configured")
        if search.max_metric_drop is None and self.gates.allow_any_metric_drop:
            raise ValueError("search.max_metric_drop: no budget (gates.allow_any_metric_drop); set one")
        clash = sorted(set(self.variants) & set(search.candidates()))
        if clash:
            raise ValueError(f"variants: {', '.join(clash)} is the name of a search candidate; rename it")
        latency = self.validate_.latency
        measured = {shape_key(b, s) for b in latency.batch_sizes for s in latency.seq_lens}
        if search.rank_at is not None and search.rank_at not in measured:
            raise ValueError(
                f"search.rank_at: {search.rank_at!r} is not a measured shape; validate.latency gives "
                f"{', '.join(sorted(measured))}"
            )

    def _check_decision_settings(self) -> None:
        """gates / release refer to shapes that validate measures and to variants that exist."""
        latency = self.validate_.latency
        measured = {shape_key(b, s) for b in latency.batch_sizes for s in latency.seq_lens}
        for key in self.gates.speedup_at or []:
            if key not in measured:
                raise ValueError(
                    f"gates.speedup_at: {key!r} is not a measured shape; "
                    f"validate.latency gives {', '.join(sorted(measured))}"
                )
        fastest_at = self.release.fastest_at
        if fastest_at is not None and fastest_at not in measured:
            raise ValueError(
                f"release.fastest_at: {fastest_at!r} is not a measured shape; validate.latency gives "
                f"{', '.join(sorted(measured))}"
            )
        if self.release.pick != "fastest_within_gates" and self.release.pick not in self.variants:
            raise ValueError(
                f"release.pick: {self.release.pick!r} is not a variant; expected fastest_within_gates "
                f"or one of {', '.join(self.variants)}"
            )
        if isinstance(self.gates.apply_to, list):
            unknown = [n for n in self.gates.apply_to if n not in self.variants]
            if unknown:
                raise ValueError(
                    f"gates.apply_to: {', '.join(map(repr, unknown))} not a variant; "
                    f"variants: {', '.join(self.variants)}"
                )

    def primary_latency_key(self) -> str:
        """The shape the chart and the release pick rank by: release.fastest_at, else the first one."""
        latency = self.validate_.latency
        return self.release.fastest_at or shape_key(latency.batch_sizes[0], latency.seq_lens[0])


def _parse_steps(variant: str, steps: Any) -> list[dict[str, Any]]:
    """Turn `[optimize, {quantize: {mode: dynamic}}]` into validated {stage, config} steps."""
    if steps is None:
        return []
    if not isinstance(steps, list):
        raise ValueError(f"variants.{variant}: expected a list of steps, got {type(steps).__name__}")
    parsed = []
    for index, step in enumerate(steps):
        where = f"variants.{variant}.{index}"
        if isinstance(step, str):
            name, raw = step, {}
        elif isinstance(step, dict) and len(step) == 1:
            name, raw = next(iter(step.items()))
            raw = raw or {}
        else:
            raise ValueError(f"{where}: expected a stage name or {{stage: {{config}}}}, got {step!r}")
        if name not in VARIANT_STEPS:
            raise ValueError(f"{where}: unknown step {name!r}; expected one of {', '.join(VARIANT_STEPS)}")
        try:
            config = STEP_CONFIGS[name].model_validate(raw)
        except ValidationError as err:
            raise ValueError(f"{where}.{name}.{_first_error(err)}") from None
        parsed.append({"stage": name, "config": config.model_dump(mode="json", by_alias=True)})
    return parsed


def _first_error(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    return f"{loc}: {_describe(first)}" if loc else _describe(first)


def _describe(error: dict[str, Any]) -> str:
    """'expected int >= 11, got "18a"' style text for one pydantic error."""
    kind, msg, ctx = error["type"], error["msg"], error.get("ctx") or {}
    got = json.dumps(error.get("input"), default=str)
    if len(got) > 80:
        got = got[:77] + "..."
    if kind == "extra_forbidden":
        return "unknown key (not allowed here; check the spelling)"
    if kind == "missing":
        return "required field is missing"
    if kind in ("int_parsing", "int_type", "int_from_float"):
        return f"expected an integer, got {got}"
    if kind in ("float_parsing", "float_type"):
        return f"expected a number, got {got}"
    if kind in ("bool_parsing", "bool_type"):
        return f"expected true or false, got {got}"
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        op = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}[
            kind
        ]
        bound = next(iter(ctx.values()), "")
        return f"expected a value {op} {bound}, got {got}"
    if kind == "literal_error":
        return f"expected {ctx.get('expected', 'one of the allowed values')}, got {got}"
    if kind == "value_error":
        return msg.removeprefix("Value error, ")
    return f"{msg}, got {got}"


def recipe_from_dict(document: Any, source: str = "<recipe>") -> Recipe:
    """Validate a parsed recipe document; errors name `source`, the field path and the problem."""
    if document is None:
        raise RecipeError(f"{source}: the recipe is empty")
    if not isinstance(document, dict):
        raise RecipeError(f"{source}: expected a mapping at the top level, got {type(document).__name__}")
    try:
        return Recipe.model_validate(document)
    except ValidationError as err:
        first = err.errors()[0]
        # repr() for a key that is not a plain word (a newline in a key would break the one line).
        loc = (
            ".".join(
                str(p) if str(p).isprintable() and str(p).strip() == str(p) and str(p) else repr(p)
                for p in first["loc"]
                if p != "validate_"
            )
            or "(top level)"
        )
        if first["loc"] and first["loc"][0] == "validate_":
            loc = "validate" + loc.removeprefix("validate")
        described = _describe(first)
        if described.startswith(f"{loc}.") or loc == "(top level)":
            raise RecipeError(f"{source}: {described}") from None  # the message carries its own path
        raise RecipeError(f"{source}: {loc}: {described}") from None
    except RecipeError as err:  # raised by the stage registry while parsing steps
        raise RecipeError(f"{source}: {err}") from None


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read and validate a recipe file; `overrides` are `dotted.key=yaml_value` strings."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(err, "problem", None) or "invalid YAML"
        raise RecipeError(f"{path}: not valid YAML{where}: {problem}") from None
    except UnicodeDecodeError:
        raise RecipeError(f"{path}: not a UTF-8 text file") from None
    for override in overrides or []:
        document = apply_override(document, override, source=str(path))
    return recipe_from_dict(document, source=str(path))


def apply_override(document: Any, override: str, source: str) -> Any:
    """Apply `a.b.c=value` (value parsed as YAML) to a recipe document, for reduced runs."""
    key, sep, raw = override.partition("=")
    if not sep or not key:
        raise RecipeError(f"--set {override!r}: expected dotted.key=value")
    if not isinstance(document, dict):
        raise RecipeError(f"{source}: expected a mapping at the top level")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        raise RecipeError(f"--set {override!r}: value is not valid YAML") from None
    node = document
    parts = key.split(".")
    for part in parts[:-1]:
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
            continue
        if not isinstance(node, dict):
            raise RecipeError(f"--set {override!r}: {part!r} is not a mapping in {source}")
        if node.get(part) is None:
            node[part] = {}
        node = node[part]
    if isinstance(node, list) and parts[-1].isdigit():
        node[int(parts[-1])] = value
    elif isinstance(node, dict):
        node[parts[-1]] = value
    else:
        raise RecipeError(f"--set {override!r}: cannot set a key inside a non-mapping")
    return document
