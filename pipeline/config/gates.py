"""Recipe section `gates`: the limits a release must meet (`make gate` exits 3 when one fails)."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, field_validator

from pipeline.config.base import StrictModel, check_provider_names, parse_shape_key


class GatesConfig(StrictModel):
    """Recipe section `gates`: limits a release must meet; `make gate` exits 3 when one fails."""

    max_metric_drop: float | None = Field(
        None,
        ge=0,
        description="Largest allowed absolute drop of the headline metric (validate.metric) vs the "
        "PyTorch fp32 baseline on the same eval examples, e.g. 0.01 = one point of F1.",
    )
    max_metric_drop_relative: float | None = Field(
        None,
        ge=0,
        description="Largest allowed drop of the headline metric as a fraction of the PyTorch fp32 "
        "baseline's, e.g. 0.03 = perplexity at most 3% higher. When neither this nor max_metric_drop "
        "is set, the task's default applies (see model.py DEFAULT_RELATIVE_DROP) unless "
        "allow_any_metric_drop says otherwise: nothing lossy is released unchecked.",
    )
    allow_any_metric_drop: bool = Field(
        False,
        description="Release without any accuracy limit (no default relative drop). Off unless said here.",
    )
    min_speedup_vs_pytorch: float | None = Field(
        None,
        gt=0,
        description="Smallest allowed speed-up vs PyTorch eager fp32 (ratio of p50 latencies measured "
        "in the same run, CPU provider), checked at every shape in speedup_at.",
    )
    speedup_at: list[str] | None = Field(
        None,
        description="Shape keys ('b<batch>_s<seq>', from validate.latency) the speed-up gates look at; "
        "None = every measured shape.",
    )
    max_model_bytes: int | None = Field(
        None, ge=1, description="Largest allowed model size on disk (model.onnx + external data)."
    )
    require_attention_fusion: bool = Field(
        False,
        description="Variants with an optimize step must have every attention layer fused (from the "
        "optimize stage's fused-op counts); variants without one pass as not applicable.",
    )
    require_provider: list[str] = Field(
        [],
        description="Execution providers each gated variant must really have run on "
        "(session.get_providers()), e.g. [CUDAExecutionProvider]; unavailable or fallen back = fail.",
    )
    apply_to: Literal["release", "all"] | list[str] = Field(
        "release",
        description="Variants `gate` checks: 'release' (the released variant; no release fails), 'all', "
        "or a list of variant names. The release pick always checks every variant.",
    )
    baseline_metric_tolerance: float = Field(
        0.005,
        ge=0,
        description="With --baseline: largest allowed absolute metric decrease vs the old report "
        "(per gated variant, and for the PyTorch baseline itself).",
    )
    baseline_speedup_tolerance: float = Field(
        0.25,
        ge=0,
        lt=1,
        description="With --baseline: largest allowed relative decrease of a speed-up ratio vs the old "
        "report, per shape (0.25 = new ratio >= 75% of the old one). Ratios, never absolute times.",
    )

    def allowed_drop(self, reference: float) -> float:
        """The largest absolute drop of the headline metric from `reference` these gates accept
        (the tighter of the absolute and relative limits; inf when neither is set)."""
        limits = [math.inf]
        if self.max_metric_drop is not None:
            limits.append(self.max_metric_drop)
        if self.max_metric_drop_relative is not None:
            limits.append(self.max_metric_drop_relative * abs(reference))
        return min(limits)

    @field_validator("speedup_at")
    @classmethod
    def _check_keys(cls, value: list[str] | None) -> list[str] | None:
        for key in value or []:
            parse_shape_key(key)  # ValueError -> "expected a shape key like 'b1_s64'"
        return value

    @field_validator("require_provider")
    @classmethod
    def _check_providers(cls, value: list[str]) -> list[str]:
        check_provider_names(value)
        return value
