"""Example types shared by every data source and task."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class TokenExample:
    """One sentence for token classification: words and their BIO tags (same length)."""

    tokens: tuple[str, ...]
    tags: tuple[str, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "tokens", tuple(self.tokens))
        object.__setattr__(self, "tags", tuple(self.tags))
        if len(self.tokens) != len(self.tags):
            raise ValueError(f"{len(self.tokens)} tokens but {len(self.tags)} tags")

    @property
    def text(self) -> str:
        return " ".join(self.tokens)

    def to_json(self) -> dict:
        return {"tokens": list(self.tokens), "tags": list(self.tags)}


@dataclass(frozen=True)
class TextExample:
    """One text for sequence classification / embeddings, with an optional class label."""

    text: str
    label: str | None = None

    def to_json(self) -> dict:
        return {"text": self.text, "label": self.label}


Example = TokenExample | TextExample


def _canonical(example: Example) -> bytes:
    return json.dumps(example.to_json(), sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()


def example_digest(example: Example) -> str:
    """sha256 of one example's content (what the overlap check between splits compares)."""
    return hashlib.sha256(_canonical(example)).hexdigest()


def examples_digest(examples: Sequence[Example]) -> str:
    """sha256 over the canonical JSON of the examples, in order (cache keys and manifests)."""
    digest = hashlib.sha256()
    for example in examples:
        digest.update(_canonical(example))
        digest.update(b"\n")
    return digest.hexdigest()
