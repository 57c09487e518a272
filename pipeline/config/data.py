"""Recipe section `data`: the train / eval / calibration splits and where they come from."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag, field_validator, model_validator

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


class SampleSpec(StrictModel):
    """Examples drawn with a seed from another split (kept in their original order). Drawn from
    train or tune, examples equal to an eval example (same content) are left out of the draw."""

    from_split: Literal["train", "tune", "eval"] = Field(
        "train", alias="from", description="Split the examples are drawn from."
    )
    samples: int = Field(128, ge=1, description="Number of examples, drawn with the seed below.")
    seed: int = Field(0, description="Seed for drawing the examples.")


def _spec_kind(value: Any) -> str:
    """A mapping with a `source` is a split of its own; anything else is drawn from another split."""
    if isinstance(value, SplitSpec) or (isinstance(value, dict) and "source" in value):
        return "source"
    return "sample"


# A split given by its own source, or drawn from another split.
SourceOrSample = Annotated[
    Annotated[SplitSpec, Tag("source")] | Annotated[SampleSpec, Tag("sample")],
    Discriminator(_spec_kind),
]


class DataConfig(StrictModel):
    """Recipe section `data`: where examples come from, and which data each use may see.

    Calibration data and the data automatic choices are scored on (`tune`) must be disjoint from
    eval, or the eval figure measures the tuning rather than the model: the pipeline compares the
    examples' content hashes before the first stage and stops (exit 2) naming both splits when
    they overlap, unless `allow_overlap` says otherwise (then the report says so).
    """

    train: SplitSpec | None = Field(None, description="Training split (fine-tune, pruning recovery).")
    eval: SplitSpec | None = Field(
        None, description="Held-out split for the reported accuracy, and nothing else."
    )
    tune: SourceOrSample | None = Field(
        None,
        description="Examples automatic choices are scored on (node exclusion, search, the fine-tune's "
        "best epoch): its own source/format/split, or {from: train, samples, seed} (then held out of "
        "train). Disjoint from eval. "
        "Without it the fine-tune keeps its best epoch on eval and the report says so.",
    )
    calibration: SourceOrSample = Field(
        default_factory=lambda: SampleSpec(from_split="train", samples=128, seed=0),
        description="Calibration data of static INT8 and GPTQ: its own source, or {from: train|tune, "
        "samples, seed} (default: 128 examples of train, seed 0). Disjoint from eval.",
    )
    allow_overlap: bool = Field(
        False,
        description="Accept tune or calibration examples that are also eval examples (reported in the "
        "report's notes). Off: such an overlap stops the run before anything is written.",
    )

    @model_validator(mode="after")
    def _check_sources(self) -> DataConfig:
        if isinstance(self.tune, SampleSpec) and self.tune.from_split != "train":
            raise ValueError(
                f"data.tune.from: {self.tune.from_split}: the tune split is drawn from train "
                "(or given its own source)"
            )
        if (
            isinstance(self.calibration, SampleSpec)
            and self.calibration.from_split == "eval"
            and not self.allow_overlap
        ):
            raise ValueError(
                "data.calibration.from: eval: calibration examples drawn from the eval split are eval "
                "examples; draw them from train or tune, give them their own source, or set "
                "data.allow_overlap: true"
            )
        return self
