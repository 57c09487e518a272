"""Shared pieces of every config model: strict pydantic models, shape keys, provider names."""

from __future__ import annotations

import json
import re
from typing import Any

from pydantic import BaseModel, ConfigDict

_SHAPE_KEY = re.compile(r"^b(\d+)_s(\d+)$")


class StrictModel(BaseModel):
    """Base for recipe sections: rejects unknown keys and validates on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)


def check_provider_names(names: list[str]) -> None:
    """ValueError naming the first entry that is not an ONNX Runtime provider name."""
    for name in names:
        if not name.endswith("ExecutionProvider"):
            raise ValueError(f"expected ONNX Runtime provider names like CUDAExecutionProvider, got {name!r}")


def shape_key(batch: int, seq: int) -> str:
    """The report's name for one input shape: b<batch>_s<seq>."""
    return f"b{int(batch)}_s{int(seq)}"


def parse_shape_key(key: str) -> tuple[int, int]:
    """(batch, seq) of a `b<batch>_s<seq>` key; ValueError for anything else."""
    match = _SHAPE_KEY.match(str(key))
    if not match:
        raise ValueError(f"expected a shape key like 'b1_s64', got {key!r}")
    return int(match.group(1)), int(match.group(2))


def canonical_json(value: Any) -> str:
    """Stable JSON used for cache keys."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
