"""Recipe section `export`: the ONNX export and the parity grid that proves it equal to PyTorch."""

from __future__ import annotations

from pydantic import Field, field_validator

from pipeline.config.base import StrictModel


class ParityConfig(StrictModel):
    """How the export is proven equal to PyTorch."""

    atol: float = Field(1e-4, gt=0, description="Largest allowed absolute difference of any output.")
    shapes: list[list[int]] = Field(
        [[1, 8], [3, 37], [2, 128]],
        description="[batch, sequence] input shapes compared; at least 3, so dynamic axes are exercised.",
    )

    past_lens: list[int] | None = Field(
        None,
        description="text-generation only: past lengths checked with one decode step each (the shapes' "
        "sequence lengths are checked as prompts with an empty past). Default: the shapes' sequence "
        "lengths.",
    )

    @field_validator("past_lens")
    @classmethod
    def _check_pasts(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and (not value or min(value) < 1):
            raise ValueError(f"expected past lengths >= 1, got {value}")
        return value

    @field_validator("shapes")
    @classmethod
    def _check_shapes(cls, value: list[list[int]]) -> list[list[int]]:
        if len(value) < 3:
            raise ValueError(f"expected at least 3 [batch, seq] shapes, got {len(value)}")
        for shape in value:
            if len(shape) != 2 or min(shape) < 1:
                raise ValueError(f"expected [batch, seq] with positive sizes, got {shape}")
        return value


class ExportConfig(StrictModel):
    """Recipe section `export`."""

    opset: int = Field(18, ge=11, le=23, description="ONNX opset version.")
    parity: ParityConfig = Field(default_factory=ParityConfig, description="Parity check vs PyTorch.")
