"""Shared pydantic base for every config model: unknown keys are errors, never warnings."""

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """Base for recipe sections: rejects unknown keys and validates on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)
