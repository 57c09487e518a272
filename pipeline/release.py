"""Release bundle for deployment teams, and its verification (onnxruntime only, no torch)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from pipeline.config import StrictModel


class ReleaseConfig(StrictModel):
    """Recipe section `release`: which variant is handed to deployment."""

    pick: Literal["fastest_within_gates"] | str = Field(
        "fastest_within_gates", description="A variant name, or the fastest variant within all gates."
    )
