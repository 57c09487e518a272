"""Recipe section `release`: which variant is handed to deployment."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from pipeline.config.base import StrictModel, parse_shape_key


class ReleaseConfig(StrictModel):
    """Recipe section `release`: which variant is handed to deployment."""

    pick: Literal["fastest_within_gates"] | str = Field(
        "fastest_within_gates",
        description="fastest_within_gates: the variant with the lowest p50 latency at fastest_at among "
        "those passing every gate; or a variant name (released only if it passes every gate).",
    )
    fastest_at: str | None = Field(
        None,
        description="Shape key ('b<batch>_s<seq>') that ranks speed for the pick and the report's chart; "
        "default: the first batch size and sequence length of validate.latency.",
    )

    @field_validator("fastest_at")
    @classmethod
    def _check_key(cls, value: str | None) -> str | None:
        if value is not None:
            parse_shape_key(value)
        return value
