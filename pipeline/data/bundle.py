"""DataBundle: lazy, cached access to a recipe's train / tune / eval / calibration splits."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.config.data import DataConfig, SampleSpec
from pipeline.data.examples import Example, TextExample, TokenExample, example_digest, examples_digest
from pipeline.data.sources import load_split
from pipeline.errors import InputError

SPLITS = ("train", "tune", "eval", "calibration")


class DataBundle:
    """A recipe's data splits (its `data` section for a task), read on first use and cached.

    `get(split)` returns the examples of "train", "tune", "eval" or "calibration" (InputError when
    the split is not configured or empty); `digest(split)` a sha256 of them; `labels()` the sorted
    label set; `overlap(a, b)` how many examples two splits share (by content hash). A split given as
    {from: <split>, samples, seed} is drawn with `random.Random(seed)` from that split, its examples
    kept in their original order.
    """

    def __init__(
        self, data: DataConfig | None, task: str | None, *, base_dir: str | Path | None = None
    ) -> None:
        self.data = data
        self.task = task
        self.base_dir = Path(base_dir) if base_dir is not None else None
        self._cache: dict[str, list[Example]] = {}

    @classmethod
    def from_recipe(cls, recipe: Any, *, base_dir: str | Path | None = None) -> DataBundle:
        """The splits of a Recipe's `data` section for its model's task."""
        return cls(recipe.data, recipe.model.task, base_dir=base_dir)

    @classmethod
    def from_examples(
        cls,
        task: str,
        *,
        train: Sequence[Example] | None = None,
        eval: Sequence[Example] | None = None,  # noqa: A002 - the split's name
        calibration: Sequence[Example] | None = None,
        tune: Sequence[Example] | None = None,
    ) -> DataBundle:
        """A bundle over in-memory examples (tests, helpers); same API as a recipe's bundle."""
        bundle = cls(None, task)
        for name, examples in (
            ("train", train),
            ("tune", tune),
            ("eval", eval),
            ("calibration", calibration),
        ):
            if examples is not None:
                bundle._cache[name] = list(examples)
        return bundle

    # -- splits ------------------------------------------------------------------------------------

    def has(self, split: str) -> bool:
        """Whether `split` is configured (calibration: whenever its source split is)."""
        self._check_name(split)
        if split in self._cache:
            return True
        if self.data is None:
            return False
        spec = getattr(self.data, split)
        if isinstance(spec, SampleSpec):
            return self.has(spec.from_split)
        return spec is not None

    def get(self, split: str) -> list[Example]:
        self._check_name(split)
        if split not in self._cache:
            self._cache[split] = self._load(split)
        return self._cache[split]

    def digest(self, split: str) -> str:
        """sha256 of the split's examples, in order (for cache keys and manifests)."""
        return examples_digest(self.get(split))

    def selection_split(self) -> str:
        """Where training keeps its best epoch: tune when the recipe has one, else eval."""
        return "tune" if self.has("tune") else "eval"

    def overlap(self, split: str, other: str) -> int:
        """How many examples of `split` are also examples of `other` (equal content)."""
        mine = {example_digest(e) for e in self.get(split)}
        return sum(example_digest(e) in mine for e in self.get(other))

    def labels(self) -> list[str]:
        """Sorted label set of train (+ eval): BIO tags for NER, classes for classification."""
        labels: set[str] = set()
        found = False
        for split in ("train", "eval"):
            if not self.has(split):
                continue
            found = True
            for example in self.get(split):
                if isinstance(example, TokenExample):
                    labels.update(example.tags)
                elif isinstance(example, TextExample) and example.label is not None:
                    labels.add(example.label)
        if not found:
            raise InputError("data: no train or eval split configured; cannot know the labels")
        return sorted(labels)

    def view(self, splits: tuple[str, ...]) -> DataView:
        """This bundle restricted to `splits`: what a stage declared it reads (and is keyed on)."""
        return DataView(self, splits)

    # -- internals ---------------------------------------------------------------------------------

    @staticmethod
    def _check_name(split: str) -> None:
        if split not in SPLITS:
            raise InputError(f"data: unknown split {split!r}; expected one of {', '.join(SPLITS)}")

    def _load(self, split: str) -> list[Example]:
        if self.data is None:
            raise InputError(f"data.{split}: not configured")
        spec = getattr(self.data, split)
        if isinstance(spec, SampleSpec):
            if not self.has(spec.from_split):
                raise InputError(f"data.{split}: draws from data.{spec.from_split}, which is not configured")
            # tune is drawn from train as read (train then leaves those examples out).
            pool = self._source("train") if split == "tune" else self.get(spec.from_split)
            if spec.from_split != "eval" and self.has("eval"):
                # Duplicates are common in real corpora (a retweet in train and in eval): a drawn
                # split leaves out examples equal to an eval example, so it never measures eval.
                held_out = {example_digest(e) for e in self.get("eval")}
                pool = [e for e in pool if example_digest(e) not in held_out]
            return draw_sample(pool, spec.samples, spec.seed)
        if spec is None:
            raise InputError(f"data.{split}: not configured")
        if split == "train" and isinstance(self.data.tune, SampleSpec):
            # A tune split drawn from train is held out of it: the fine-tune's best epoch is chosen
            # on examples it did not learn from.
            tune = {id(e) for e in self.get("tune")}
            kept = [e for e in self._source("train") if id(e) not in tune]
            if not kept:
                raise InputError(f"data.tune: its {len(tune)} examples take all of data.train")
            return kept
        return self._source(split)

    def _source(self, split: str) -> list[Example]:
        """The split as its own source gives it (read once)."""
        key = f"{split}:source"
        if key not in self._cache:
            assert self.task is not None and self.data is not None
            spec = getattr(self.data, split)
            self._cache[key] = load_split(spec, self.task, base_dir=self.base_dir, name=split)
        return self._cache[key]


class DataView:
    """A DataBundle restricted to the splits a stage declared: reading another one is a bug in the
    stage (its cache key would not cover it), so it fails loudly."""

    def __init__(self, bundle: DataBundle, splits: tuple[str, ...]) -> None:
        self._bundle, self.splits = bundle, tuple(splits)

    def _allowed(self, split: str) -> None:
        if split not in self.splits:
            raise RuntimeError(
                f"a stage read data split {split!r} it did not declare (declared: {self.splits})"
            )

    def has(self, split: str) -> bool:
        return split in self.splits and self._bundle.has(split)

    def get(self, split: str) -> list[Example]:
        self._allowed(split)
        return self._bundle.get(split)

    def digest(self, split: str) -> str:
        self._allowed(split)
        return self._bundle.digest(split)

    def selection_split(self) -> str:
        return "tune" if self.has("tune") else "eval"

    def labels(self) -> list[str]:
        for split in ("train", "eval"):
            if self._bundle.has(split):
                self._allowed(split)
        return self._bundle.labels()


def draw_sample(examples: Sequence[Example], samples: int, seed: int) -> list[Example]:
    """`samples` examples drawn with `random.Random(seed)`, kept in their original order."""
    if samples >= len(examples):
        return list(examples)
    indices = sorted(random.Random(seed).sample(range(len(examples)), samples))
    return [examples[i] for i in indices]
