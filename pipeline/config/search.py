"""Recipe section `search`: the fastest model within the accuracy budget, instead of a fixed menu.

The search crosses the model as it is (dense) and every pruning listed with every quantization
listed; each candidate is a chain of the usual stages (cached and shared like variants), scored on
the tune split with the task's headline metric against PyTorch fp32, and timed interleaved on this
machine. The fastest candidate within the budget is validated on eval like any variant; the
report lists every candidate tried (metric, drop, speed, seconds it cost) and those skipped.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator

from pipeline.config.base import StrictModel, parse_shape_key
from pipeline.config.prune import PruneConfig
from pipeline.config.quantize import QuantizeConfig


class SearchTimingConfig(StrictModel):
    """The quick interleaved timing that ranks the candidates (validation re-times the winner)."""

    iters: int = Field(30, ge=1, description="Timed runs per candidate and shape.")
    block: int = Field(10, ge=1, description="Timed runs per turn of the round robin.")
    warmup: int = Field(3, ge=0, description="Untimed runs per candidate and shape.")
    settle: int = Field(2, ge=0, description="Untimed runs opening every turn.")


class SearchConfig(StrictModel):
    """Recipe section `search`."""

    max_metric_drop: float | None = Field(
        None,
        ge=0,
        description="Budget: the largest drop of the headline metric on the tune split vs PyTorch fp32 "
        "(positive = worse). None = the gates' limit (max_metric_drop, or max_metric_drop_relative x "
        "PyTorch's tune metric, the tighter of the two).",
    )
    quantize: list[QuantizeConfig] = Field(
        default_factory=lambda: [QuantizeConfig(mode="dynamic"), QuantizeConfig(mode="static")],
        min_length=1,
        description="Quantization steps to try on every (pruned or dense) model.",
    )
    prune: list[PruneConfig] = Field(
        [], description="Pruning steps to try besides the dense model (each with its recovery)."
    )
    include_fp32: bool = Field(False, description="Also try each model without quantization.")
    rank_at: str | None = Field(
        None,
        description="Shape key ('b<batch>_s<seq>') whose p50 ranks the candidates. None = the release's "
        "primary shape (release.fastest_at, else the first validate.latency shape).",
    )
    max_seconds: float | None = Field(
        None,
        gt=0,
        description="Stop building new candidates (cheapest first: no training before pruning with "
        "recovery) once the search has spent this many seconds; the rest are reported as skipped.",
    )
    timing: SearchTimingConfig = Field(default_factory=SearchTimingConfig, description="Candidate timing.")

    @field_validator("rank_at")
    @classmethod
    def _check_key(cls, value: str | None) -> str | None:
        if value is not None:
            parse_shape_key(value)
        return value

    def candidates(self) -> dict[str, list[dict[str, Any]]]:
        """Candidate name -> its steps (as a variant's), cheapest first (no pruning, then pruning)."""
        prunings: list[tuple[str, PruneConfig | None]] = [("dense", None)]
        for config in self.prune:
            amount = config.amount if config.amount is not None else config.heads_per_layer
            label = f"{config.kind}{round(amount * 100) if config.amount is not None else amount}"
            if config.recover_epochs:
                label += f"r{config.recover_epochs}"
            prunings.append((label, config))
        quantizations: list[tuple[str, QuantizeConfig | None]] = [("fp32", None)] if self.include_fp32 else []
        modes = [q.mode.replace("weight_only_", "") for q in self.quantize]
        for index, config in enumerate(self.quantize):
            mode = modes[index]
            quantizations.append((mode if modes.count(mode) == 1 else f"{mode}{index}", config))
        out: dict[str, list[dict[str, Any]]] = {}
        for prune_label, prune in prunings:
            for quant_label, quantize in quantizations:
                steps = []
                if prune is not None:
                    steps.append({"stage": "prune", "config": prune.model_dump(mode="json", by_alias=True)})
                if quantize is not None:
                    steps.append(
                        {"stage": "quantize", "config": quantize.model_dump(mode="json", by_alias=True)}
                    )
                out[f"search-{prune_label}-{quant_label}"] = steps
        return out
