"""The configs layer: every recipe section as a typed pydantic model, and `Recipe` itself.

Imports nothing of the package but `pipeline.errors`: every other layer may use these models, and
a stage receives its own section (plus what it declares it reads) rather than the whole recipe.
"""

from pipeline.config.base import StrictModel, canonical_json, check_provider_names, parse_shape_key, shape_key
from pipeline.config.data import DataConfig, SampleSpec, SplitSpec
from pipeline.config.export import ExportConfig, ParityConfig
from pipeline.config.finetune import FinetuneConfig
from pipeline.config.gates import GatesConfig
from pipeline.config.model import TRAINABLE_TASKS, ModelSpec, TaskName
from pipeline.config.optimize import OptimizeConfig
from pipeline.config.prune import PruneConfig
from pipeline.config.quantize import AutoExcludeConfig, QuantizeConfig
from pipeline.config.recipe import (
    STEP_CONFIGS,
    VARIANT_STEPS,
    Recipe,
    Step,
    apply_override,
    load_recipe,
    recipe_from_dict,
)
from pipeline.config.release import ReleaseConfig
from pipeline.config.search import SearchConfig, SearchTimingConfig
from pipeline.config.validate import CPU, GenerationConfig, LatencyConfig, ValidateConfig

__all__ = [
    "CPU",
    "STEP_CONFIGS",
    "TRAINABLE_TASKS",
    "VARIANT_STEPS",
    "AutoExcludeConfig",
    "DataConfig",
    "ExportConfig",
    "FinetuneConfig",
    "GatesConfig",
    "GenerationConfig",
    "LatencyConfig",
    "ModelSpec",
    "OptimizeConfig",
    "ParityConfig",
    "PruneConfig",
    "QuantizeConfig",
    "Recipe",
    "ReleaseConfig",
    "SampleSpec",
    "SearchConfig",
    "SearchTimingConfig",
    "SplitSpec",
    "Step",
    "StrictModel",
    "TaskName",
    "ValidateConfig",
    "apply_override",
    "canonical_json",
    "check_provider_names",
    "load_recipe",
    "parse_shape_key",
    "recipe_from_dict",
    "shape_key",
]
