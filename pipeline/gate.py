"""CI gate: check a report against the recipe's limits and an optional baseline report."""

from __future__ import annotations

from pydantic import Field

from pipeline.config import StrictModel


class GatesConfig(StrictModel):
    """Recipe section `gates`: limits a release must meet; `make gate` exits 3 when one fails."""

    max_metric_drop: float | None = Field(
        None, ge=0, description="Largest allowed absolute metric drop vs the PyTorch fp32 baseline."
    )
    min_speedup_vs_pytorch: float | None = Field(
        None, gt=0, description="Smallest allowed speed-up vs PyTorch eager, measured in the same run."
    )
