"""Datasets for fine-tuning, calibration and validation (see `sources` for the source strings)."""

from pipeline.data.bundle import SPLITS, DataBundle, draw_sample
from pipeline.data.examples import Example, TextExample, TokenExample, examples_digest
from pipeline.data.sources import load_split, resolve_package, slice_bounds

__all__ = [
    "SPLITS",
    "DataBundle",
    "Example",
    "TextExample",
    "TokenExample",
    "draw_sample",
    "examples_digest",
    "load_split",
    "resolve_package",
    "slice_bounds",
]
