"""Shared pydantic base for every config model: unknown keys are errors, never warnings."""

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """Base for recipe sections: rejects unknown keys and validates on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)


def check_provider_names(names: list[str]) -> None:
    """ValueError naming the first entry that is not an ONNX Runtime provider name."""
    for name in names:
        if not name.endswith("ExecutionProvider"):
            raise ValueError(f"expected ONNX Runtime provider names like CUDAExecutionProvider, got {name!r}")
