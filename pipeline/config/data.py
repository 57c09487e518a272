"""Recipe section `data`: the train / eval / calibration splits and where they come from."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator

from pipeline.config.base import StrictModel

SLICE_PATTERN = re.compile(r"^\s*(\d+%?)?\s*:\s*(\d+%?)?\s*$")


class SplitSpec(StrictModel):
    """One data split: a source, its format, and a deterministic slice of its examples."""

    source: str = Field(
        min_length=1,
        description="package:<package>/<path inside it>, hf:<dataset>[/<config>], or a local path.",
    )
    format: Literal["conll", "jsonl", "csv", "folders", "hf"] | None = Field(
        None, description="File format; inferred from the source when omitted."
    )
    split: str = Field(
        ":",
        description="Slice of the examples in file order, Python-style with optional percentages: "
        "'0:80%', '80%:', ':500'.",
    )
    hf_split: str = Field("train", description="Split name for hf: datasets.")
    text_column: str = Field("text", description="Text column (jsonl, csv, hf).")
    label_column: str = Field("label", description="Label column (jsonl, csv, hf).")
    tokens_column: str = Field("tokens", description="Token list column for NER (jsonl, hf).")
    tags_column: str = Field("ner_tags", description="Tag list column for NER (jsonl, hf).")
    limit: int | None = Field(None, ge=1, description="Keep at most this many examples after slicing.")

    @field_validator("split")
    @classmethod
    def _check_slice(cls, value: str) -> str:
        match = SLICE_PATTERN.match(value)
        if not match:
            raise ValueError(f"expected a slice like '0:80%' or '80%:', got {value!r}")
        for part in match.groups():
            if part and part.endswith("%") and int(part[:-1]) > 100:
                raise ValueError(f"percentage over 100% in {value!r}")
        return value


class CalibrationSpec(StrictModel):
    """Calibration examples for static quantization, drawn from another split."""

    from_split: Literal["train", "eval"] = Field(
        "train", alias="from", description="Split the calibration examples are drawn from."
    )
    samples: int = Field(128, ge=1, description="Number of examples, drawn with the seed below.")
    seed: int = Field(0, description="Seed for drawing the examples.")


class DataConfig(StrictModel):
    """Recipe section `data`."""

    train: SplitSpec | None = Field(None, description="Training split (fine-tune, pruning recovery).")
    eval: SplitSpec | None = Field(None, description="Held-out split for accuracy.")
    calibration: CalibrationSpec = Field(
        default_factory=CalibrationSpec, description="Static quantization calibration data."
    )
