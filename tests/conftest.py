"""Shared pytest fixtures: tiny models built from configs (no network), recipe writers.

The builders behind them live in tests/helpers.py (`from helpers import ...`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from helpers import CLS_LABELS, NER_LABELS, WNUT_LABELS, tiny_model


@pytest.fixture(scope="session")
def bare_dir(tmp_path_factory) -> Path:
    """A random-weight BERT without a task head and a word-level tokenizer (fine-tuning tests)."""
    return tiny_model(tmp_path_factory.mktemp("bare") / "model", head="base", tokenizer="words")


@pytest.fixture
def one_thread():
    """Tiny models: one intra-op thread is faster and immune to other jobs on the 2 cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_ner_model(tmp_path_factory) -> Path:
    """A random-weight BERT token classifier (NER_LABELS) with the real MiniLM tokenizer."""
    return tiny_model(tmp_path_factory.mktemp("tiny-ner") / "model", head="token", labels=NER_LABELS)


@pytest.fixture(scope="session")
def tiny_wnut_model(tmp_path_factory) -> Path:
    """A random-weight BERT token classifier with every WNUT-16 tag (scored on the packaged file
    without fine-tuning) and the real MiniLM tokenizer."""
    return tiny_model(tmp_path_factory.mktemp("tiny-wnut") / "model", head="token", labels=WNUT_LABELS)


@pytest.fixture(scope="session")
def tiny_cls_model(tmp_path_factory) -> Path:
    """A random-weight BERT sequence classifier (neg/pos) with the real MiniLM tokenizer."""
    return tiny_model(tmp_path_factory.mktemp("tiny-cls") / "model", head="sequence", labels=CLS_LABELS)


@pytest.fixture
def write_recipe(tmp_path):
    """write_recipe(dict or text) -> path of a recipe file in tmp_path."""

    def write(document, name: str = "recipe.yaml") -> Path:
        path = tmp_path / name
        path.write_text(document if isinstance(document, str) else yaml.safe_dump(document))
        return path

    return write
