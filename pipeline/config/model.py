"""Recipe section `model`: where the model comes from and which task head it is used with."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from pipeline.config.base import StrictModel

TaskName = Literal[
    "token-classification",
    "text-classification",
    "feature-extraction",
    "question-answering",
    "text-generation",
]
# The accuracy limit a recipe gets when its gates set none (a fraction of the PyTorch baseline's
# headline metric): a lossy variant is never released unchecked.
DEFAULT_RELATIVE_DROP: dict[str, float] = {
    "token-classification": 0.02,
    "text-classification": 0.01,
    "feature-extraction": 0.01,
    "question-answering": 0.02,
    "text-generation": 0.03,
}
# Tasks whose head this package can train (fine-tune, pruning recovery).
TRAINABLE_TASKS = ("token-classification", "text-classification")


class ModelSpec(StrictModel):
    """Recipe section `model`: where the model comes from and what it does."""

    source: str = Field(
        min_length=1,
        description="Hub id (e.g. dslim/bert-base-NER), a local folder, or package:<python package> "
        "for a model shipped inside an installed package.",
    )
    task: TaskName = Field(description="The task head the model is used with.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    max_length: int = Field(128, ge=8, le=8192, description="Tokenizer truncation length.")
    trust_remote_code: bool = Field(
        False, description="Run code shipped with a hub model. Off unless turned on here."
    )
